import type { Faults } from '../faults.js';

export type SnapshotStrategy = 'background-snapshot' | 'stopped-precopy';

export interface SnapshotOptions {
  /** QMP socket of the running VM (unix path or host:port). */
  qmp: string;
  /** Path of the snapshot file to create. */
  out: string;
  /** Migration bandwidth limit in bytes per second (default: unlimited). */
  maxBandwidth?: number;
  /** Replace an existing file at `out`. */
  overwrite?: boolean;
  /** Directory for the new disk overlays (default: beside each disk image). */
  overlayDir?: string;
  /** The QEMU command line, recorded in the manifest for restore. */
  commandLine?: string[];
  /** How long to wait for QEMU to capture the device state (default 60 s). */
  captureTimeoutMs?: number;
  /** Where the per-VM intent records live (default: defaultStateDir()). */
  stateDir?: string;
  /** Test-only: fault points to strike (faults.ts). */
  faults?: Faults;
}

export interface SnapshotDisk {
  device: string;
  /** The image as of the snapshot instant; nothing writes to it any more. */
  frozenFile: string;
  /** Where the running VM's disk lives now. */
  overlayFile: string;
}

export interface SnapshotResult {
  file: string;
  id: string;
  strategy: SnapshotStrategy;
  /** Guest pause, from QEMU's STOP and RESUME event timestamps (0 when it was paused already). */
  downtimeMs: number;
  totalMs: number;
  streamMs: number;
  ramBytes: number;
  pagesWritten: number;
  zeroPages: number;
  streamBytes: number;
  fileBytes: number;
  allocatedBytes: number;
  pointInTime: string;
  qemuVersion: string;
  machine: string;
  disks: SnapshotDisk[];
  skippedDisks: { device: string; reason: string }[];
  runState: string;
}

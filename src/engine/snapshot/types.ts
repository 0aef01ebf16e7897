import type { Faults } from '../faults.js';
import type { StreamTransport } from './receiver.js';

/**
 * `background-snapshot`: a running guest, point in time = the start (QEMU write-protects RAM);
 * `stopped-precopy`: a paused guest migrated as it is; `live-precopy`: a running guest whose RAM
 * QEMU cannot write-protect (a lazily restored VM), migrated while it runs and frozen at the
 * switchover (pause-before-switchover): point in time = the switchover pause (switchover.ts).
 */
export type SnapshotStrategy = 'background-snapshot' | 'stopped-precopy' | 'live-precopy';

/** How live-precopy bounds the guest's pause and makes a busy guest converge (switchover.ts). */
export interface PrecopyTuning {
  /** The downtime QEMU aims at when it decides to switch over (QEMU's downtime-limit). */
  downtimeLimitMs?: number;
  /** Throttle the vCPUs of a guest that dirties RAM faster than it is sent (auto-converge). */
  autoConverge?: boolean;
  /** Raise the downtime limit when no switchover came this long after `migrate`. */
  raiseAfterMs?: number;
  /** Switch over whatever is left, the guest paused as long as it takes, this long after `migrate`. */
  forceAfterMs?: number;
}

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
  /** live-precopy only: how the pause is bounded (defaults measured, see docs/benchmarks.md). */
  precopy?: PrecopyTuning;
  /**
   * How the stream reaches qsnap: `pipe` (QEMU's `exec:` pipe, read through /proc; the default
   * for a local QEMU qsnap may read) or `unix` (a socket qsnap listens on; the default otherwise).
   */
  transport?: StreamTransport;
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
  transport: StreamTransport;
  /** Guest pause, from QEMU's STOP and RESUME event timestamps (0 when it was paused already). */
  downtimeMs: number;
  totalMs: number;
  streamMs: number;
  ramBytes: number;
  pagesWritten: number;
  zeroPages: number;
  streamBytes: number;
  /** Page records for a page already sent (pre-copy resends pages the guest dirtied). */
  duplicatePages: number;
  fileBytes: number;
  allocatedBytes: number;
  pointInTime: string;
  qemuVersion: string;
  machine: string;
  disks: SnapshotDisk[];
  skippedDisks: { device: string; reason: string }[];
  runState: string;
  /** live-precopy: how the migration converged. */
  precopy?: PrecopyReport;
}

export interface PrecopyReport {
  /** From `migrate` to QEMU's switchover pause (the guest ran throughout). */
  precopyMs: number;
  /** Passes over dirty RAM until the switchover (QEMU's dirty-sync-count). */
  passes: number;
  /** The downtime limit in force at the switchover. */
  downtimeLimitMs: number;
  /** auto-converge's vCPU throttle at the switchover (0: none). */
  throttlePercent: number;
}

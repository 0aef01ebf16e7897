import type { Vm } from '../../vm/launcher.js';

export type RestoreMode = 'full' | 'lazy';

export interface RestoreOptions {
  /** The snapshot file. */
  file: string;
  /** The QEMU command line the VM was started with (binary first, or options only). */
  argv: string[];
  /** Map the main RAM block straight from the snapshot file instead of loading it. */
  lazy?: boolean;
  /** Leave the guest paused after loading. */
  paused?: boolean;
  /** QMP socket to add when the command line has none (default `<runDir>/qmp.sock`). */
  qmp?: string;
  /** Where the restore overlays go (default: beside each frozen layer). */
  overlayDir?: string;
  /** Directory for QEMU's log and qsnap's control socket (default: a new temp directory, kept while QEMU runs). */
  runDir?: string;
  /**
   * 'auto' (default): check everything the restore reads — every page it sends; in lazy mode
   * the mapped RAM block is not read, so not checked. 'full': verify the whole file first.
   */
  verify?: 'auto' | 'full';
  /** Keep QEMU attached to this process (tests); default: it outlives qsnap. */
  attached?: boolean;
  /**
   * Move the command line's unix sockets and pidfile into the run directory: for a restore
   * beside a VM that still runs with that command line (it would lose its sockets otherwise).
   */
  relocateSockets?: boolean;
  /**
   * Where each disk's frozen layer is now, by device, when it is not where the manifest says
   * (a snapshot imported from another machine, its disks flattened into the store).
   */
  frozenLayers?: Record<string, string>;
  /**
   * Told the overlays the restore is about to make and where its run directory will be, before
   * any of them exists: a caller that records them can always tell what an interrupted restore left.
   */
  onPlanned?: (planned: { overlays: string[]; runDir: string }) => Promise<void>;
  /** Told what the restore made (overlays, run directory) before QEMU starts, so a caller can record it. */
  onPrepared?: (made: { overlays: string[]; runDir: string }) => Promise<void>;
  /**
   * Told the new QEMU's pid and QMP socket as soon as it answers (before the state is loaded);
   * `unref` lets this process exit while that QEMU waits (Vm.unref).
   */
  onLaunched?: (qemu: { pid: number; qmp: string; unref(): void }) => Promise<void>;
  /**
   * Awaited once QEMU waits for the stream (checked, `migrate-incoming` set up) and before any
   * of it is sent: a warm spare (harness/spare.ts) holds the restore here until it is wanted.
   * A rejection undoes the restore like any failure (QEMU stopped, overlays removed).
   */
  beforeLoad?: () => Promise<void>;
}

export interface RestoredDisk {
  device: string;
  frozenFile: string;
  /** The new overlay the restored VM writes to. */
  overlayFile: string;
}

export interface RestoreResult {
  mode: RestoreMode;
  /** From the start of the command to the guest running (or loaded, with paused). */
  restoreMs: number;
  /** Time QEMU took from migrate-incoming to a completed load. */
  loadMs: number;
  /**
   * How the state reached QEMU: 'mapped-ram', QEMU ≥ 9.0 reading the snapshot file itself (format
   * 2, full restore, fresh RAM), its pages checked by qsnap meanwhile; else the 'stream' qsnap builds.
   */
  loadPath: 'mapped-ram' | 'stream';
  pid: number;
  /** The restored VM's QMP socket. */
  qmp: string;
  runDir: string;
  logFile: string;
  runState: string;
  disks: RestoredDisk[];
  argv: string[];
  /** Unix sockets (and pidfile) moved into the run directory: original path → new path. */
  relocated: Record<string, string>;
  /** The running QEMU, when the caller asked to keep it attached. */
  vm?: Vm;
}

import type { SnapshotWriter } from '../../format/index.js';
import type { QmpClient, QmpEvent } from '../../qmp/index.js';
import type { PlannedOverlay } from '../disks/freeze.js';
import type { Faults } from '../faults.js';
import type { IntentHandle } from '../intent.js';
import type { MigrationSettings } from '../migration.js';
import type { OperationContext } from '../operation.js';
import type { VmInfo } from '../probe.js';
import type { StreamReceiver, StreamTransport } from './receiver.js';
import type { PrecopyReport, SnapshotOptions, SnapshotStrategy } from './types.js';

/**
 * What a snapshot knows once it holds the VM's lock: fixed for the rest of the sequence, but
 * for `strategy`, which prepare changes once when QEMU cannot write-protect RAM (pause.ts).
 */
export interface SnapshotContext {
  options: SnapshotOptions;
  op: OperationContext;
  qmp: QmpClient;
  vm: VmInfo;
  strategy: SnapshotStrategy;
  id: string;
  out: string;
  /** `$TMPDIR/qsnap-stream-<id>` (or /tmp when TMPDIR is too deep for a socket): the migration socket's directory (in the intent from the start). */
  socketDir: string;
  /** The local QEMU process, when qsnap can see it (peer.ts). */
  qemuPid: number | undefined;
  transport: StreamTransport;
  overlays: PlannedOverlay[];
  skipped: { device: string; reason: string }[];
  intent: IntentHandle;
  faults: Faults;
  startedAt: number;
}

/** The guest's pause as QEMU reports it, and how far the sequence got. */
export interface PauseState {
  stopEvent: QmpEvent | undefined;
  resumeEvent: QmpEvent | undefined;
  /** The transaction ran: the guest writes to the overlays. */
  frozen: boolean;
  /** `migrate` returned and the migration has not been seen to end. */
  migrating: boolean;
}

/** What the sequence has set up so far: what a failure must undo. */
export interface SnapshotRun {
  socketDir: string;
  receiver: StreamReceiver;
  writer: SnapshotWriter | undefined;
  pause: PauseState;
  /** The user's migration settings while qsnap's are in force. */
  settings: MigrationSettings | undefined;
  /** live-precopy: how the migration converged, known at the switchover. */
  precopy: PrecopyReport | undefined;
}

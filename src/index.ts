/**
 * qsnap's library API: the same operations the CLI runs, as typed functions that report
 * progress as events and return data.
 */

export { type ConnectOptions as DaemonConnectOptions, connect, type DaemonClient } from './client/client.js';
export { DaemonError } from './daemon/errors.js';
export { type Event as DaemonEvent, PROTOCOL_VERSION } from './daemon/protocol.js';
export { type ConnectOptions, connectVm } from './engine/connect.js';
export { ExportError, RestoreError, SnapshotError, VerifyError } from './engine/errors.js';
export { Operation, type OperationEvent } from './engine/operation.js';
export { type DiskInfo, probeVm, type QemuVersion, type VmInfo } from './engine/probe.js';
export { type ExportOptions, type ExportResult, exportStream } from './engine/restore/export.js';
export {
  type RestoredDisk,
  type RestoreMode,
  type RestoreOptions,
  type RestoreResult,
  restore,
} from './engine/restore/restore.js';
export type { RecoveryReport } from './engine/snapshot/recovery.js';
export {
  type SnapshotDisk,
  type SnapshotOptions,
  type SnapshotResult,
  type SnapshotStrategy,
  snapshot,
} from './engine/snapshot/snapshot.js';
export { defaultStateDir } from './engine/state-dir.js';
export { type SnapshotVerifyResult, verifySnapshot } from './engine/verify.js';
export { asQsnapError, QsnapError, type QsnapErrorJson } from './errors.js';
export { type Manifest, openSnapshot, SnapshotFileError, type SnapshotReader } from './format/index.js';
export { GuestConsole } from './guest/console.js';
export { bootTestGuest, type TestGuest, type TestGuestOptions, testGuestSpec } from './guest/test-guest.js';
export { MachineError, type MachineErrorCode } from './harness/errors.js';
export { sweepMachines } from './harness/leftovers.js';
export {
  type CallOptions,
  type Checkpoint,
  Machine,
  type MachineExit,
  type MachineOptions,
  type MachineState,
  type RevertResult,
} from './harness/machine.js';
export { launchTestGuest, type TestGuestCommandLine, testGuestArgv } from './harness/test-guest.js';
export { QmpClient } from './qmp/index.js';
export { type AccelDecision, resolveAccel } from './vm/accel.js';
export { VmError } from './vm/errors.js';
export { type ExitInfo, type LaunchOptions, Vm } from './vm/launcher.js';
export { DiskSpec, VmSpec } from './vm/spec.js';

/**
 * qsnap's library API: the same operations the CLI runs, as typed functions that report
 * progress as events and return data.
 */

export { connectVm } from './engine/connect.js';
export { RestoreError, SnapshotError } from './engine/errors.js';
export { type RecoveryReport, recoverStaleIntent } from './engine/intent.js';
export { Operation, type OperationEvent } from './engine/operation.js';
export { type DiskInfo, probeVm, type QemuVersion, type VmInfo } from './engine/probe.js';
export {
  exportStream,
  type RestoredDisk,
  type RestoreMode,
  type RestoreOptions,
  type RestoreResult,
  restore,
} from './engine/restore/restore.js';
export {
  type SnapshotDisk,
  type SnapshotOptions,
  type SnapshotResult,
  type SnapshotStrategy,
  snapshot,
} from './engine/snapshot/snapshot.js';
export { type SnapshotVerifyResult, verifySnapshot } from './engine/verify.js';
export { asQsnapError, QsnapError, type QsnapErrorJson } from './errors.js';
export { type Manifest, openSnapshot, SnapshotFileError, type SnapshotReader } from './format/index.js';
export { GuestConsole } from './guest/console.js';
export { bootTestGuest, type TestGuest, type TestGuestOptions, testGuestSpec } from './guest/test-guest.js';
export { type Checkpoint, Machine, type MachineOptions, type RevertResult } from './harness/machine.js';
export { QmpClient } from './qmp/index.js';
export { type AccelDecision, resolveAccel } from './vm/accel.js';
export { VmError } from './vm/errors.js';
export { type ExitInfo, type LaunchOptions, Vm } from './vm/launcher.js';
export { DiskSpec, VmSpec } from './vm/spec.js';

import { QsnapError } from '../errors.js';

/**
 * Errors of the test-harness API (`Machine`). A failed call leaves the machine as it was:
 * everything a revert can check is checked before the running QEMU is touched.
 *
 *   MachineError
 *   ├── QSNAP_MACHINE_CLOSED                the machine was closed; launch a new one
 *   ├── QSNAP_MACHINE_DEAD                  its QEMU exited; revert to a checkpoint (or close)
 *   ├── QSNAP_MACHINE_CHECKPOINT_EXISTS     a checkpoint of that name exists (and overwrite was not asked for)
 *   ├── QSNAP_MACHINE_CHECKPOINT_UNKNOWN    the checkpoint was deleted, or is not this machine's
 *   ├── QSNAP_MACHINE_CHECKPOINT_MISSING    the checkpoint's file (or a disk layer it needs) is gone
 *   ├── QSNAP_MACHINE_CHECKPOINT_MISMATCH   the checkpoint cannot be reverted into this machine (id, RAM, machine type, disks)
 *   ├── QSNAP_MACHINE_TIMEOUT               a call did not finish within its timeoutMs (it was undone)
 *   └── QSNAP_MACHINE_ABORTED               a call's AbortSignal fired (it was undone)
 */
export type MachineErrorCode =
  | 'QSNAP_MACHINE_CLOSED'
  | 'QSNAP_MACHINE_DEAD'
  | 'QSNAP_MACHINE_CHECKPOINT_EXISTS'
  | 'QSNAP_MACHINE_CHECKPOINT_UNKNOWN'
  | 'QSNAP_MACHINE_CHECKPOINT_MISSING'
  | 'QSNAP_MACHINE_CHECKPOINT_MISMATCH'
  | 'QSNAP_MACHINE_TIMEOUT'
  | 'QSNAP_MACHINE_ABORTED';

export class MachineError extends QsnapError<MachineErrorCode> {}

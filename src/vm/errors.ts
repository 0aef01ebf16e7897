import { QsnapError } from '../errors.js';

/**
 * Errors of launching and stopping QEMU.
 *
 *   VmError
 *   ├── QSNAP_VM_SPEC        the spec or argv is invalid (zod issues in details)
 *   ├── QSNAP_VM_NO_QEMU     the QEMU binary is not installed
 *   ├── QSNAP_VM_LAUNCH      QEMU exited or never answered QMP during start-up
 *   ├── QSNAP_VM_ACCEL       QEMU exited during start-up because the KVM it was given cannot be used
 *   └── QSNAP_VM_STOP        QEMU did not stop even after SIGKILL
 */
export type VmErrorCode =
  | 'QSNAP_VM_SPEC'
  | 'QSNAP_VM_NO_QEMU'
  | 'QSNAP_VM_LAUNCH'
  | 'QSNAP_VM_ACCEL'
  | 'QSNAP_VM_STOP';

export class VmError extends QsnapError<VmErrorCode> {}

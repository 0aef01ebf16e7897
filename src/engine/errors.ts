import { QsnapError } from '../errors.js';

/**
 * Errors of the engine's operations, one class per family. A failed operation names what the
 * guest and its disks look like afterwards (details.guest: 'running' | 'paused' | 'gone',
 * details.cleanup: what was put back, details.disks: disks left on a new overlay).
 *
 *   SnapshotError                    snapshot/
 *   ├── QSNAP_SNAPSHOT_UNSUPPORTED   the VM cannot be snapshotted this way (VFIO, no uffd-wp, run state…)
 *   ├── QSNAP_SNAPSHOT_BUSY          another qsnap or a migration is working on this VM
 *   ├── QSNAP_SNAPSHOT_OUTPUT        the output path cannot be written
 *   ├── QSNAP_SNAPSHOT_DISK          preparing or freezing a disk failed
 *   ├── QSNAP_SNAPSHOT_MIGRATION     QEMU's migration failed, or QEMU did not capture in time
 *   ├── QSNAP_SNAPSHOT_QEMU_GONE     QEMU exited during the snapshot
 *   ├── QSNAP_SNAPSHOT_QMP_LOST      the QMP connection closed mid-snapshot while QEMU ran on
 *   ├── QSNAP_SNAPSHOT_INCOMPLETE    the stream ended without every page
 *   ├── QSNAP_SNAPSHOT_CANCELLED     cancelled by the user
 *   └── QSNAP_SNAPSHOT_FAILED        anything else (the cause is kept)
 *   RestoreError                     restore/
 *   ├── QSNAP_RESTORE_FORMAT         the file cannot be restored this way (no stream header, layout)
 *   ├── QSNAP_RESTORE_DISKS          the command line's disks do not match, or an overlay cannot be made
 *   ├── QSNAP_RESTORE_QEMU_VERSION   this QEMU is older than the snapshot's
 *   ├── QSNAP_RESTORE_MACHINE        the machine type differs
 *   ├── QSNAP_RESTORE_RAM_SIZE       the RAM size differs
 *   ├── QSNAP_RESTORE_LAZY_UNSAFE    --lazy with devices that discard RAM
 *   ├── QSNAP_RESTORE_LOAD           QEMU refused the state or did not finish loading
 *   └── QSNAP_RESTORE_FAILED         anything else (the cause is kept)
 *   ExportError                      restore/export.ts
 *   └── QSNAP_EXPORT_EXISTS          the output exists and overwrite was not asked for
 *   VerifyError                      verify.ts
 *   └── QSNAP_VERIFY_DISK_MISSING    a disk layer the snapshot needs is gone or unreadable
 *
 * Warnings (operation events of type 'warning', never thrown):
 *   QSNAP_RESUME_LATE                QEMU did not resume the guest after the capture; qsnap did
 *   QSNAP_PRECOPY_STOPPED            live-precopy cannot be trusted here: the guest pauses for the whole transfer
 *   QSNAP_MIGRATION_SETTINGS         the user's migration settings could not be put back (or a limit raised)
 *   QSNAP_CLEANUP                    putting the VM back after a failure was incomplete
 *   QSNAP_CMDLINE_UNKNOWN            no QEMU command line could be recorded with a snapshot
 *   QSNAP_STORE_DEFERRED             layers of a replaced or deleted snapshot stay until a later gc
 */
export type SnapshotErrorCode =
  | 'QSNAP_SNAPSHOT_UNSUPPORTED'
  | 'QSNAP_SNAPSHOT_BUSY'
  | 'QSNAP_SNAPSHOT_OUTPUT'
  | 'QSNAP_SNAPSHOT_DISK'
  | 'QSNAP_SNAPSHOT_MIGRATION'
  | 'QSNAP_SNAPSHOT_QEMU_GONE'
  | 'QSNAP_SNAPSHOT_QMP_LOST'
  | 'QSNAP_SNAPSHOT_INCOMPLETE'
  | 'QSNAP_SNAPSHOT_CANCELLED'
  | 'QSNAP_SNAPSHOT_FAILED';

export type RestoreErrorCode =
  | 'QSNAP_RESTORE_FORMAT'
  | 'QSNAP_RESTORE_DISKS'
  | 'QSNAP_RESTORE_QEMU_VERSION'
  | 'QSNAP_RESTORE_MACHINE'
  | 'QSNAP_RESTORE_RAM_SIZE'
  | 'QSNAP_RESTORE_LAZY_UNSAFE'
  | 'QSNAP_RESTORE_LOAD'
  | 'QSNAP_RESTORE_FAILED';

export type ExportErrorCode = 'QSNAP_EXPORT_EXISTS';

export type VerifyErrorCode = 'QSNAP_VERIFY_DISK_MISSING';

export type WarningCode =
  | 'QSNAP_RESUME_LATE'
  | 'QSNAP_PRECOPY_STOPPED'
  | 'QSNAP_MIGRATION_SETTINGS'
  | 'QSNAP_CLEANUP'
  | 'QSNAP_CMDLINE_UNKNOWN'
  | 'QSNAP_STORE_DEFERRED';

export class SnapshotError extends QsnapError<SnapshotErrorCode> {}
export class RestoreError extends QsnapError<RestoreErrorCode> {}
export class ExportError extends QsnapError<ExportErrorCode> {}
export class VerifyError extends QsnapError<VerifyErrorCode> {}

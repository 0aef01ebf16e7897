import { QsnapError } from '../errors.js';

/**
 * Errors of the snapshot and restore operations. Each names what the guest and its disks
 * look like afterwards (details.guest: 'running' | 'paused' | 'gone', details.disks).
 *
 *   SnapshotError
 *   ├── QSNAP_SNAPSHOT_UNSUPPORTED   the VM cannot be snapshotted this way (VFIO, no uffd-wp, …)
 *   ├── QSNAP_SNAPSHOT_BUSY          another snapshot or migration of this VM is running
 *   ├── QSNAP_SNAPSHOT_OUTPUT        the output path cannot be written
 *   ├── QSNAP_SNAPSHOT_DISK          preparing or freezing a disk failed
 *   ├── QSNAP_SNAPSHOT_MIGRATION     QEMU's migration failed or was cancelled
 *   ├── QSNAP_SNAPSHOT_QEMU_GONE     QEMU exited during the snapshot
 *   ├── QSNAP_SNAPSHOT_INCOMPLETE    the stream ended without every page
 *   └── QSNAP_SNAPSHOT_CANCELLED     cancelled by the user
 *   RestoreError                     QSNAP_RESTORE_*
 */
export class SnapshotError extends QsnapError {}
export class RestoreError extends QsnapError {}

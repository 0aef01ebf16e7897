import { QsnapError } from '../errors.js';

/**
 * Errors of the snapshot store. A failed store operation deleted nothing it had not planned,
 * and its catalog is as before or as after, never half written.
 *
 *   StoreError
 *   ├── QSNAP_STORE_NAME           a snapshot name is not [A-Za-z0-9._-]{1,64} (or is . or ..)
 *   ├── QSNAP_STORE_EXISTS         the name is taken (and overwrite was not asked for)
 *   ├── QSNAP_STORE_NOT_FOUND      no snapshot of that name
 *   ├── QSNAP_STORE_ACCESS         the store directory cannot be created, read or written
 *   ├── QSNAP_STORE_CATALOG        the catalog is damaged or from a newer qsnap: nothing was changed
 *   ├── QSNAP_STORE_LOCKED         another qsnap held the store's lock for too long
 *   ├── QSNAP_STORE_LAYER          a disk layer a snapshot needs is missing or was changed
 *   ├── QSNAP_STORE_NO_CMDLINE     no QEMU command line is known for the snapshot
 *   ├── QSNAP_STORE_UNTRUSTED      the command line came from another machine: confirm it first
 *   ├── QSNAP_STORE_MERGE          merging a disk layer failed (nothing was removed)
 *   └── QSNAP_STORE_BUNDLE         a bundle is damaged or not a qsnap bundle
 */
export type StoreErrorCode =
  | 'QSNAP_STORE_NAME'
  | 'QSNAP_STORE_EXISTS'
  | 'QSNAP_STORE_NOT_FOUND'
  | 'QSNAP_STORE_ACCESS'
  | 'QSNAP_STORE_CATALOG'
  | 'QSNAP_STORE_LOCKED'
  | 'QSNAP_STORE_LAYER'
  | 'QSNAP_STORE_NO_CMDLINE'
  | 'QSNAP_STORE_UNTRUSTED'
  | 'QSNAP_STORE_MERGE'
  | 'QSNAP_STORE_BUNDLE';

export class StoreError extends QsnapError<StoreErrorCode> {}

import { QsnapError } from '../errors.js';

/**
 * Errors of the daemon (`qsnap serve`) and its client:
 *
 *   DaemonError
 *     QSNAP_BUSY                 the VM runs an operation and the request said wait: false
 *     QSNAP_DAEMON_REQUEST       a frame that is not a valid request (JSON, envelope, op, args)
 *     QSNAP_DAEMON_LIMIT         too many requests in flight on one connection
 *     QSNAP_DAEMON_NO_VM         no attached VM has that id
 *     QSNAP_DAEMON_VM_GONE       the VM's QEMU exited (queued operations of it fail with this)
 *     QSNAP_DAEMON_CANCELLED     the operation was cancelled before it changed anything
 *     QSNAP_DAEMON_NO_OP         no operation has that id (or its result is no longer kept)
 *     QSNAP_DAEMON_NOT_CANCELLABLE  the operation is past the point where it can stop safely
 *     QSNAP_DAEMON_PATH          a path in a request that the daemon does not accept
 *     QSNAP_DAEMON_TOKEN         the token file is missing, malformed, or readable by others
 *     QSNAP_DAEMON_LISTEN        the daemon cannot listen where it was told
 *     QSNAP_DAEMON_CONNECT       the client cannot reach the daemon, or was refused (401, 403)
 *     QSNAP_DAEMON_DISCONNECTED  the connection closed with requests pending (they go on in the daemon)
 *     QSNAP_DAEMON_WORKER        a worker thread running an operation died
 */
export type DaemonErrorCode =
  | 'QSNAP_BUSY'
  | 'QSNAP_DAEMON_REQUEST'
  | 'QSNAP_DAEMON_LIMIT'
  | 'QSNAP_DAEMON_NO_VM'
  | 'QSNAP_DAEMON_VM_GONE'
  | 'QSNAP_DAEMON_CANCELLED'
  | 'QSNAP_DAEMON_NO_OP'
  | 'QSNAP_DAEMON_NOT_CANCELLABLE'
  | 'QSNAP_DAEMON_PATH'
  | 'QSNAP_DAEMON_TOKEN'
  | 'QSNAP_DAEMON_LISTEN'
  | 'QSNAP_DAEMON_CONNECT'
  | 'QSNAP_DAEMON_DISCONNECTED'
  | 'QSNAP_DAEMON_WORKER';

export class DaemonError extends QsnapError<DaemonErrorCode> {}

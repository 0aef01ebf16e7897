import { type ChildProcess, spawn } from 'node:child_process';
import type { Socket } from 'node:net';
import type { Writable } from 'node:stream';

/**
 * A background snapshot, once begun, must be read to its end. QEMU 7.2 leaves guest RAM
 * write-protected with nobody to resolve the faults when the stream breaks or the migration
 * is cancelled: the guest hangs for good and QEMU refuses further background snapshots
 * (measured here; newer QEMUs stop the write tracking on every exit path). So a failure of
 * qsnap never closes the stream: the drain guard — a small detached process holding a copy of
 * the socket — reads the rest to /dev/null. It starts when told to, or by itself when qsnap
 * dies (even by SIGKILL), because the pipe it waits on then reaches end-of-file.
 *
 * The guard is a Node process holding the migration socket as its fd 4 and a pipe from qsnap
 * as its fd 3. It reads nothing until a line arrives on the pipe or the pipe reaches
 * end-of-file; then it reads the socket to its end and exits. The socket is passed as fd 4,
 * not as stdin: libuv makes a child's fds 0–2 blocking, and the flag is shared with qsnap's
 * own descriptor of the socket.
 */
const PROGRAM = `// qsnap drain guard
process.title = 'qsnap-drain-guard';
const net = require('node:net');
let draining = false;
function drain() {
  if (draining) return;
  draining = true;
  const stream = new net.Socket({ fd: 4, readable: true, writable: false });
  stream.on('data', () => {});
  stream.on('end', () => process.exit(0));
  stream.on('error', () => process.exit(0));
}
const control = new net.Socket({ fd: 3, readable: true, writable: false });
control.on('data', drain);
control.on('end', drain);
control.on('error', drain);
`;

export class DrainGuard {
  private constructor(private readonly child: ChildProcess) {}

  /** Start a guard holding `socket`; it waits, reading nothing, until told or until qsnap dies. */
  static spawn(socket: Socket): DrainGuard {
    const child = spawn(process.execPath, ['-e', PROGRAM], {
      stdio: ['ignore', 'ignore', 'ignore', 'pipe', socket],
      detached: true,
    });
    child.on('error', () => undefined);
    child.unref();
    (child.stdio[3] as unknown as Socket | undefined)?.unref?.();
    return new DrainGuard(child);
  }

  /** Let the guard read the rest of the stream (qsnap gives up on it). */
  drain(): void {
    const control = this.child.stdio[3] as Writable | null | undefined;
    if (control?.writable) control.end('\n');
  }

  /** The stream was read to its end by qsnap itself: the guard is not needed. */
  dismiss(): void {
    this.child.kill('SIGKILL');
  }
}

import { type ChildProcess, spawn } from 'node:child_process';
import type { Server, Socket } from 'node:net';
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
 *
 * Between `migrate` and qsnap accepting QEMU's connection there is no stream to hold yet, so a
 * first guard holds the listening socket instead (`spawnListening`): if qsnap dies in that
 * window, that guard accepts QEMU's connection and drains it. Once qsnap has accepted, the
 * connection's guard replaces it.
 *
 * Over a pipe (pipe-source.ts) one guard does both: started before `migrate`, it waits for the
 * placeholder's pid file, opens the pipe itself and tells qsnap (a line `held` on its control
 * socket), after which qsnap kills the placeholder. If qsnap dies, the guard kills the
 * placeholder (if it is still there) and reads the pipe to its end.
 */
/**
 * How long a guard holding the listening socket waits for QEMU to connect once qsnap died:
 * QEMU connects while it runs the `migrate` command (its connection then waits in the
 * backlog); a `migrate` qsnap never sent never connects.
 */
const LISTENING_GUARD_WAIT_MS = 5000;

const PROGRAM = `// qsnap drain guard
process.title = 'qsnap-drain-guard';
const net = require('node:net');
const fs = require('node:fs');
const mode = process.argv[1];
const listening = mode === 'listening';
let draining = false;
let pipe;
function read(stream) {
  stream.on('data', () => {});
  stream.on('end', () => process.exit(0));
  stream.on('error', () => process.exit(0));
}
function drain() {
  if (draining) return;
  draining = true;
  if (mode === 'pipe') return pipe ? drainPipe() : setTimeout(() => process.exit(0), ${LISTENING_GUARD_WAIT_MS});
  if (!listening) return read(new net.Socket({ fd: 4, readable: true, writable: false }));
  // qsnap died before it accepted QEMU's connection: accept it here (QEMU may be about to
  // connect, or be waiting in the backlog), read it to its end. Nobody coming: exit.
  const server = net.createServer((socket) => {
    clearTimeout(timer);
    server.close();
    read(socket);
  });
  server.on('error', () => process.exit(0));
  server.listen({ fd: 4 });
  const timer = setTimeout(() => process.exit(0), ${LISTENING_GUARD_WAIT_MS});
}
// The placeholder of migrate exec: writes its pid; its stdin is QEMU's pipe (pipe-source.ts).
function holdPipe() {
  try {
    const text = fs.readFileSync(process.argv[2], 'utf8');
    if (!text.endsWith('\\n')) return;
    const pid = Number(text.trim());
    const fd = fs.openSync('/proc/' + pid + '/fd/0', fs.constants.O_RDONLY | fs.constants.O_NONBLOCK);
    const stat = fs.fstatSync(fd);
    if (!stat.isFIFO()) return fs.closeSync(fd);
    pipe = { fd, pid, ino: stat.ino };
  } catch {}
}
function drainPipe() {
  try {
    if (fs.statSync('/proc/' + pipe.pid + '/fd/0').ino === pipe.ino) process.kill(pipe.pid, 'SIGKILL');
  } catch {}
  read(new net.Socket({ fd: pipe.fd, readable: true, writable: false }));
}
const control = new net.Socket({ fd: 3, readable: true, writable: mode === 'pipe' });
control.on('data', drain);
control.on('end', drain);
control.on('error', drain);
if (mode === 'pipe') {
  const poll = setInterval(() => {
    holdPipe();
    if (!pipe) return;
    clearInterval(poll);
    control.write('held\\n', () => undefined);
    if (draining) drainPipe();
  }, 2);
}
`;

export class DrainGuard {
  private constructor(private readonly child: ChildProcess) {}

  /** Start a guard holding `socket`; it waits, reading nothing, until told or until qsnap dies. */
  static spawn(socket: Socket): DrainGuard {
    return DrainGuard.start('connected', socket);
  }

  /** Start a guard holding the listening `server` (before QEMU connects): see above. */
  static spawnListening(server: Server): DrainGuard | undefined {
    const fd = (server as unknown as { _handle?: { fd?: number } })._handle?.fd;
    return typeof fd === 'number' && fd >= 0 ? DrainGuard.start('listening', fd) : undefined;
  }

  /**
   * Start a guard for the pipe of `migrate exec:` (pipe-source.ts), before `migrate`: it opens
   * the pipe of the placeholder named by `pidFile`; `onHeld` runs once it holds it.
   */
  static spawnForPipe(pidFile: string, onHeld: () => void): DrainGuard {
    const guard = DrainGuard.start('pipe', 'ignore', [pidFile]);
    const control = guard.child.stdio[3] as unknown as Socket | undefined;
    let heard = '';
    control?.on('data', (chunk: Buffer) => {
      heard += chunk.toString();
      if (heard.includes('held\n')) onHeld();
    });
    return guard;
  }

  private static start(
    mode: 'connected' | 'listening' | 'pipe',
    held: Socket | number | 'ignore',
    args: string[] = [],
  ): DrainGuard {
    const child = spawn(process.execPath, ['-e', PROGRAM, mode, ...args], {
      stdio: ['ignore', 'ignore', 'ignore', 'pipe', held],
      detached: true,
    });
    child.on('error', () => undefined);
    child.unref();
    const control = child.stdio[3] as unknown as Socket | undefined;
    control?.unref?.();
    // drain() to a guard that is gone (it exits when its stream ends) is EPIPE, not a crash of
    // a long-running qsnap (the daemon).
    control?.on('error', () => undefined);
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

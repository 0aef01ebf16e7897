/**
 * A worker thread's exit must leave the process's fds alone. The snapshot pipe is opened with
 * fs and closed by the net.Socket that reads it (pipe-source.ts, socket-reader.ts); with Node's
 * default `trackUnmanagedFds` the worker closes that fd number again when it exits, and by then
 * the number is another thread's (the daemon aborted in libuv's signal handler). Here the
 * worker does just that with a FIFO, and the main thread checks the fds it opened meanwhile.
 */
import { execFileSync } from 'node:child_process';
import { closeSync, fstatSync, mkdtempSync, openSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Worker } from 'node:worker_threads';
import { afterAll, describe, expect, it } from 'vitest';
import { WORKER_OPTIONS } from '../../src/daemon/worker-host.js';

const WORKER = `
const { openSync, constants } = require('node:fs');
const { Socket } = require('node:net');
const { parentPort, workerData } = require('node:worker_threads');
const fd = openSync(workerData.fifo, constants.O_RDONLY | constants.O_NONBLOCK);
const socket = new Socket({ fd, readable: true, writable: false });
socket.on('close', () => {
  parentPort.postMessage('closed');
  parentPort.once('message', () => parentPort.close());
});
socket.destroy();
`;

describe('worker threads of the daemon', () => {
  const dir = mkdtempSync(join(tmpdir(), 'qsnap-worker-fds-'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  /** Fds the main thread opened after the worker's socket closed, and whether each outlived the worker. */
  async function fdsAfterWorker(options: { trackUnmanagedFds: boolean }): Promise<boolean[]> {
    const fifo = join(dir, `fifo-${options.trackUnmanagedFds}`);
    execFileSync('mkfifo', [fifo]);
    const worker = new Worker(WORKER, { eval: true, workerData: { fifo }, ...options });
    await new Promise<void>((resolve) => worker.once('message', () => resolve()));
    // The lowest free numbers: the one the worker's socket just closed among them.
    const mine = [0, 1, 2, 3].map(() => openSync('/dev/null', 'r'));
    worker.postMessage('exit');
    await new Promise((resolve) => worker.once('exit', resolve));
    const alive = mine.map((fd) => {
      try {
        fstatSync(fd);
        return true;
      } catch {
        return false;
      }
    });
    for (const [i, fd] of mine.entries()) if (alive[i]) closeSync(fd);
    return alive;
  }

  it("leave the main thread's fds open when they exit", async () => {
    expect(WORKER_OPTIONS.trackUnmanagedFds).toBe(false);
    expect(await fdsAfterWorker(WORKER_OPTIONS)).toEqual([true, true, true, true]);
  });

  it("negative control: with Node's default tracking, the worker's exit closes one of them", async () => {
    expect(await fdsAfterWorker({ trackUnmanagedFds: true })).toContain(false);
  });
});

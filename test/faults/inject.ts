/**
 * The faults of the phase × fault matrix, each struck at the moment an operation enters a phase
 * (its `phase` event): qsnap SIGKILLed (the CLI's `kill-at:<phase>` fault), QEMU SIGKILLed,
 * the QMP connection closed by the peer (a proxy between qsnap and QEMU that drops it), the
 * output file system full (a filler file takes what is left), the output directory removed,
 * a slow disk (the store on a loop device throttled by the blkio cgroup), a second qsnap racing
 * on the same VM.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdirSync, rmSync, statfsSync } from 'node:fs';
import { createConnection, createServer, type Server, type Socket } from 'node:net';
import { join } from 'node:path';

export const FAULTS = [
  'kill-qsnap',
  'kill-qemu',
  'qmp-closed',
  'fs-full',
  'dir-removed',
  'slow-disk',
  'race',
] as const;
export type Fault = (typeof FAULTS)[number];

/** What each fault is, for the table. */
export const FAULT_TEXT: Record<Fault, string> = {
  'kill-qsnap': 'qsnap SIGKILLed',
  'kill-qemu': 'QEMU SIGKILLed',
  'qmp-closed': 'QMP closed by the peer',
  'fs-full': 'output file system full',
  'dir-removed': 'output directory removed',
  'slow-disk': 'slow disk (2–16 MB/s)',
  race: 'a second qsnap races',
};

/**
 * A unix socket in front of QEMU's QMP socket: qsnap talks to QEMU through it, and `cut()`
 * closes qsnap's side as QEMU would when it goes away — while QEMU itself runs on.
 */
export class QmpProxy {
  private readonly clients = new Set<Socket>();
  private server: Server | undefined;

  constructor(
    readonly path: string,
    private readonly target: string,
  ) {}

  async start(): Promise<void> {
    this.server = createServer((client) => {
      const upstream = createConnection(this.target);
      this.clients.add(client);
      client.pipe(upstream).pipe(client);
      const drop = () => {
        this.clients.delete(client);
        client.destroy();
        upstream.destroy();
      };
      client.on('error', drop).on('close', drop);
      upstream.on('error', drop).on('close', drop);
    });
    await new Promise<void>((resolve) => this.server!.listen(this.path, resolve));
  }

  /** Close every connection through the proxy now. */
  cut(): void {
    for (const client of this.clients) client.destroy();
  }

  async stop(): Promise<void> {
    this.cut();
    await new Promise<void>((resolve) => (this.server ? this.server.close(() => resolve()) : resolve()));
    rmSync(this.path, { force: true });
  }
}

/**
 * Take every free byte of the file system under `dir` (a filler file; synchronous, so it strikes
 * at the very moment of the phase); `undo` gives them back.
 */
export function fillUp(dir: string): () => void {
  const filler = join(dir, `.filler-${process.pid}`);
  const fs = statfsSync(dir);
  // The space a running guest's writes take meanwhile can make one exact fallocate fail: smaller
  // pieces until one fits, then zeros fill the rest to the last byte.
  for (let size = fs.bavail * fs.bsize - 4096; size >= 2 ** 20; size = Math.floor(size / 2)) {
    if (spawnSync('fallocate', ['-l', String(size), filler]).status === 0) break;
  }
  spawnSync('sh', ['-c', `cat /dev/zero > ${filler}.rest 2>/dev/null`]);
  return () => {
    rmSync(filler, { force: true });
    rmSync(`${filler}.rest`, { force: true });
  };
}

/** Remove a directory with everything in it (the fault), and make it again (undo). */
export function removeDir(dir: string): () => void {
  rmSync(dir, { recursive: true, force: true });
  return () => mkdirSync(dir, { recursive: true });
}

/**
 * A slow disk: a file system on a loop device whose writes the blkio cgroup throttles to
 * `bytesPerSecond` (all writeback to it is throttled, whoever wrote). Root only.
 */
export function slowDisk(dir: string, bytesPerSecond: number): { mount: string; undo: () => void } {
  const image = join(dir, 'slow.img');
  const mount = join(dir, 'slow');
  mkdirSync(mount, { recursive: true });
  execFileSync('truncate', ['-s', '1G', image]);
  const loop = execFileSync('losetup', ['-f', '--show', image], { encoding: 'utf8' }).trim();
  execFileSync('mkfs.ext4', ['-q', loop]);
  execFileSync('mount', [loop, mount]);
  const device = execFileSync('stat', ['-c', '%t:%T', loop], { encoding: 'utf8' })
    .trim()
    .split(':')
    .map((h) => Number.parseInt(h, 16))
    .join(':');
  const throttle = '/sys/fs/cgroup/blkio/blkio.throttle.write_bps_device';
  execFileSync('sh', ['-c', `echo "${device} ${bytesPerSecond}" > ${throttle}`]);
  return {
    mount,
    undo: () => {
      spawnSync('sh', ['-c', `echo "${device} 0" > ${throttle}`]);
      spawnSync('umount', ['-l', mount]);
      spawnSync('losetup', ['-d', loop]);
      rmSync(image, { force: true });
    },
  };
}

/** Whether this machine can throttle a loop device (cgroup v1 blkio, root). */
export function canThrottle(): boolean {
  return (
    process.getuid?.() === 0 &&
    spawnSync('sh', [
      '-c',
      'test -w /sys/fs/cgroup/blkio/blkio.throttle.write_bps_device && command -v losetup',
    ]).status === 0
  );
}

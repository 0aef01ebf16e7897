/**
 * A sandbox per test file: its own TMPDIR and QSNAP_STATE_DIR (set in this process while it is
 * open, and in the environment it gives CLI children), so every leftover found is this file's
 * own; a directory on tmpfs, one on a disk filesystem; and tmpfs mounts of its own. `dispose` unmounts, puts TMPDIR and
 * QSNAP_STATE_DIR back and removes it all, even when a test failed.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { ROOT } from './env.js';

export interface Sandbox {
  /** Guest directories, snapshots and overlays (on disk). */
  root: string;
  /** This file's TMPDIR: qsnap's stream sockets, restore's run directories and guest dirs land here. */
  tmp: string;
  /** This file's QSNAP_STATE_DIR (intent records). */
  state: string;
  /** Where snapshots are written. */
  out: string;
  /** A directory on tmpfs (/dev/shm): shared guest RAM, and snapshots a lazy restore maps. */
  shm: string;
  /**
   * A directory on the repository's filesystem (under .qsnap/), where snapshots live as they
   * will in a store: a disk filesystem wherever /tmp is tmpfs. Holds no sockets (long path).
   */
  disk: string;
  /** Environment for CLI children: same TMPDIR and QSNAP_STATE_DIR, no fault. */
  env: NodeJS.ProcessEnv;
  /** Mounts a tmpfs at a new directory under root; unmounted by dispose. */
  mountTmpfs(options: string): Promise<string>;
  unmount(dir: string): void;
  dispose(): Promise<void>;
}

/** Short names: every unix socket path under root must stay below 108 bytes. */
export async function openSandbox(name: string): Promise<Sandbox> {
  const root = await mkdtemp(join('/tmp', `qt-${name}-`));
  const tmp = join(root, 'tmp');
  const state = join(root, 'state');
  const out = join(root, 'out');
  await Promise.all([mkdir(tmp), mkdir(state), mkdir(out)]);
  const shm = await mkdtemp(join('/dev/shm', `qt-${name}-`));
  await mkdir(join(ROOT, '.qsnap'), { recursive: true });
  const disk = await mkdtemp(join(ROOT, '.qsnap', `qt-${name}-`));
  const saved = { TMPDIR: process.env['TMPDIR'], QSNAP_STATE_DIR: process.env['QSNAP_STATE_DIR'] };
  process.env['TMPDIR'] = tmp;
  process.env['QSNAP_STATE_DIR'] = state;
  delete process.env['QSNAP_FAULT'];
  const mounts = new Set<string>();
  let seq = 0;
  const unmount = (dir: string) => {
    if (!mounts.delete(dir)) return;
    // Lazy: a drain guard or QEMU may still hold a file there for a moment.
    spawnSync('umount', ['-l', dir], { stdio: 'ignore' });
  };
  return {
    root,
    tmp,
    state,
    out,
    shm,
    disk,
    env: { ...process.env, TMPDIR: tmp, QSNAP_STATE_DIR: state, QSNAP_FAULT: '' },
    async mountTmpfs(options: string) {
      const dir = join(root, `mnt${seq++}`);
      await mkdir(dir);
      execFileSync('mount', ['-t', 'tmpfs', '-o', options, 'qsnap-test', dir]);
      mounts.add(dir);
      return dir;
    },
    unmount,
    async dispose() {
      for (const dir of [...mounts]) unmount(dir);
      for (const [key, value] of Object.entries(saved)) {
        if (value === undefined) delete process.env[key];
        else process.env[key] = value;
      }
      await rm(shm, { recursive: true, force: true });
      await rm(disk, { recursive: true, force: true });
      await rm(root, { recursive: true, force: true });
    },
  };
}

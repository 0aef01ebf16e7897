/**
 * What this machine offers the tests, decided once when a test file loads: the repository
 * root, the built CLI's path, whether QEMU, qemu-img and the bundled test guest's image are
 * there, and whether the tests run as root.
 */
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

/** The repository root. */
export const ROOT = resolve(fileURLToPath(new URL('../../', import.meta.url)));
/** The built CLI (`node dist/cli/main.js …` is how a user runs qsnap); see build.ts. */
export const CLI = join(ROOT, 'dist/cli/main.js');

export const QEMU = 'qemu-system-x86_64';
/** qemu-system-x86_64 is installed and runs. */
export const hasQemu = spawnSync(QEMU, ['--version'], { stdio: 'ignore' }).status === 0;
/** qemu-img is installed and runs. */
export const hasQemuImg = spawnSync('qemu-img', ['--version'], { stdio: 'ignore' }).status === 0;
/** The bundled test guest's kernel and initrd are built (`make image`). */
export const hasImage =
  existsSync(join(ROOT, 'images/build/vmlinuz')) && existsSync(join(ROOT, 'images/build/initrd.img'));
/** Everything a real-guest test needs: QEMU, qemu-img and the test guest's image. */
export const canRun = hasQemu && hasQemuImg && hasImage;
/** tmpfs mounts (full and read-only file systems) need root. */
export const isRoot = process.getuid?.() === 0;

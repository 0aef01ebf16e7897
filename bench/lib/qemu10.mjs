// QEMU 10 for the bench: Debian 13's QEMU in a chroot of the bench's own (scripts/qemu-chroot.sh),
// so that a teardown never pulls the mounts from under another user of the tests' chroot.
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';

const SCRIPT = new URL('../../scripts/qemu-chroot.sh', import.meta.url).pathname;
export const CHROOT = process.env.QSNAP_BENCH_QEMU10_DIR ?? '/var/tmp/qsnap-bench-qemu10';
/** Everything QEMU 10 must see lives here: the chroot shows it at the same path. */
export const WORK = `${CHROOT}-work`;
/** The tests' chroot (test/compat/qemu10.test.ts): its root is hard-linked instead of bootstrapped again. */
const TESTS_ROOT = '/var/tmp/qsnap-qemu10/root';

const mounted = (path) => {
  try {
    execFileSync('mountpoint', ['-q', path]);
    return true;
  } catch {
    return false;
  }
};

/** Sets the chroot up (root only) and returns its QEMU wrapper; `undo` gets the teardown. */
export function setupQemu10(undo, log) {
  const root = join(CHROOT, 'root');
  if (
    !existsSync(join(root, 'usr/bin/qemu-system-x86_64')) &&
    existsSync(join(TESTS_ROOT, 'usr/bin/qemu-system-x86_64'))
  ) {
    mkdirSync(CHROOT, { recursive: true });
    log(`QEMU 10: hard-linking ${TESTS_ROOT} to ${root}`);
    execFileSync('cp', ['-al', TESTS_ROOT, `${root}.partial`]);
    execFileSync('mv', [`${root}.partial`, root]);
  }
  const shm = join(root, 'dev/shm');
  undo.push(async () => {
    if (mounted(shm)) execFileSync('umount', [shm]);
    execFileSync(SCRIPT, ['teardown', CHROOT, WORK]);
  });
  const wrapper = execFileSync(SCRIPT, ['setup', CHROOT, WORK], {
    encoding: 'utf8',
    timeout: 600_000,
  }).trim();
  // Machine keeps a lazily reverted VM's RAM file in /dev/shm (the only place QEMU can
  // write-protect it): QEMU in the chroot must see the host's.
  mkdirSync(shm, { recursive: true });
  if (!mounted(shm)) execFileSync('mount', ['--bind', '/dev/shm', shm]);
  return wrapper;
}

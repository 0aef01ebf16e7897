/**
 * Helpers of the VM launcher tests: a private TMPDIR so a test can prove that a failed launch
 * left no temp directory behind. (Whether QEMU is installed, whether a pid is really gone and
 * who still mentions a path on its command line are in test/support.)
 */
import { readdirSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

/**
 * Runs `fn` with TMPDIR pointing at a fresh empty directory (os.tmpdir() reads it on every
 * call), and returns what `fn` returned or threw plus the directory's entries afterwards.
 */
export async function withPrivateTmpdir<T>(
  fn: () => Promise<T>,
): Promise<{ result: T | undefined; error: unknown; leftovers: string[] }> {
  const dir = await mkdtemp(join(tmpdir(), 'qsnap-test-tmp-'));
  const saved = process.env['TMPDIR'];
  process.env['TMPDIR'] = dir;
  try {
    let result: T | undefined;
    let error: unknown;
    try {
      result = await fn();
    } catch (err) {
      error = err;
    }
    return { result, error, leftovers: readdirSync(dir) };
  } finally {
    if (saved === undefined) delete process.env['TMPDIR'];
    else process.env['TMPDIR'] = saved;
    await rm(dir, { recursive: true, force: true });
  }
}

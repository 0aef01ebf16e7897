/**
 * qemuCanRead: whether a QEMU process may open the snapshot file itself (a mapped-ram restore),
 * asked before QEMU is told to, since a failed `migrate-incoming` cannot be retried. Real
 * processes: this one, and a `sleep` running as nobody (root only).
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { chmodSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { qemuCanRead } from '../../src/engine/restore/incoming.js';
import { isRoot } from '../support/env.js';

describe('qemuCanRead', () => {
  const dir = mkdtempSync(join(tmpdir(), 'qsnap-can-read-'));
  const file = join(dir, 'vm.qsnap');
  writeFileSync(file, 'x');
  const children: ChildProcess[] = [];
  afterAll(() => {
    for (const c of children) c.kill('SIGKILL');
    rmSync(dir, { recursive: true, force: true });
  });

  it('a process that sees the same file and may read it: yes; a path it cannot see: no', async () => {
    chmodSync(file, 0o600);
    expect(await qemuCanRead(process.pid, file)).toBe(true);
    expect(await qemuCanRead(process.pid, join(dir, 'absent.qsnap'))).toBe(false);
    expect(await qemuCanRead(2 ** 22 + 7, file)).toBe(false); // no such process
  });

  it.skipIf(!isRoot)('another user: by the file mode (run as nobody)', async () => {
    chmodSync(dir, 0o755);
    const sleeper = spawn('sleep', ['30'], { uid: 65534, gid: 65534, stdio: 'ignore' });
    children.push(sleeper);
    await new Promise((r) => sleeper.once('spawn', r));
    chmodSync(file, 0o600);
    expect(await qemuCanRead(sleeper.pid!, file)).toBe(false);
    chmodSync(file, 0o644); // control: the same process, the file readable by others
    expect(await qemuCanRead(sleeper.pid!, file)).toBe(true);
  });
});

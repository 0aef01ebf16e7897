import { mkdirSync, rmSync } from 'node:fs';
import { afterEach, describe, expect, it } from 'vitest';
import { runDirPath, socketHome } from '../../src/vm/run-dir.js';

describe('where qsnap keeps its sockets', () => {
  const saved = process.env['TMPDIR'];
  const made: string[] = [];
  afterEach(() => {
    if (saved === undefined) delete process.env['TMPDIR'];
    else process.env['TMPDIR'] = saved;
    for (const dir of made.splice(0)) rmSync(dir, { recursive: true, force: true });
  });

  it('uses TMPDIR when a socket fits in it', () => {
    process.env['TMPDIR'] = '/var/tmp';
    expect(socketHome()).toBe('/var/tmp');
    expect(runDirPath()).toMatch(/^\/var\/tmp\/qsnap-vm-[0-9a-f]{12}$/);
  });

  it('falls back to /tmp when TMPDIR is too deep to bind a socket in', () => {
    const deep = `/tmp/${'d'.repeat(80)}`;
    mkdirSync(deep, { recursive: true });
    made.push(deep);
    process.env['TMPDIR'] = deep;
    expect(socketHome()).toBe('/tmp');
    expect(runDirPath().startsWith('/tmp/qsnap-vm-')).toBe(true);
  });
});

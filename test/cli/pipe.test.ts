/**
 * A reader that closes early (`qsnap … | head -1`) ends the command quietly: its usual exit
 * code, nothing on stderr. The control shows that the pipe really is closed before the writes.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DEVICE_TAIL, PROLOGUE, sampleInfo } from '../format/fixtures.js';
import { writeSample } from '../format/helpers.js';

const ROOT = resolve(fileURLToPath(new URL('../../', import.meta.url)));
const CLI = join(ROOT, 'dist/cli/main.js');

/** `<cmd> | true` in a shell: stderr and the exit status of the first command. */
function intoClosedPipe(command: string): { stderr: string; status: number } {
  const r = spawnSync('bash', ['-c', `${command} | true; exit \${PIPESTATUS[0]}`], { encoding: 'utf8' });
  return { stderr: r.stderr, status: r.status ?? -1 };
}

describe('stdout closed by the reader', () => {
  let dir: string;
  let file: string;

  beforeAll(async () => {
    execFileSync(join(ROOT, 'node_modules/.bin/tsc'), ['-p', 'tsconfig.build.json'], { cwd: ROOT });
    dir = mkdtempSync(join(tmpdir(), 'qsnap-pipe-'));
    file = join(dir, 'sample.qsnap');
    const w = await writeSample(file);
    await w.writer.finish({ prologue: PROLOGUE, deviceTail: DEVICE_TAIL, info: sampleInfo() });
  });

  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('--help | true: nothing on stderr, exit 0', () => {
    expect(intoClosedPipe(`node ${CLI} --help`)).toEqual({ stderr: '', status: 0 });
  });

  it('inspect (many lines) | true: nothing on stderr, exit 0', () => {
    expect(intoClosedPipe(`node ${CLI} inspect ${file}`)).toEqual({ stderr: '', status: 0 });
    expect(intoClosedPipe(`node ${CLI} inspect --json ${file}`)).toEqual({ stderr: '', status: 0 });
  });

  it('an error still has its exit code when stdout is closed', () => {
    const r = intoClosedPipe(`node ${CLI} inspect --json ${join(dir, 'missing.qsnap')}`);
    expect(r).toEqual({ stderr: '', status: 1 });
  });

  it('control: a program that writes twice into the closed pipe does crash with EPIPE', () => {
    const script = 'setTimeout(() => { process.stdout.write("a\\n"); setTimeout(() => {}, 50); }, 100)';
    const r = intoClosedPipe(`node -e '${script}'`);
    expect(r.stderr).toMatch(/EPIPE/);
    expect(r.status).not.toBe(0);
  });
});

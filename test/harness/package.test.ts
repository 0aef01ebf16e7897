/**
 * The package as a user gets it: `npm pack` from a clean clone of this checkout's HEAD (prepack
 * builds dist/), the tarball installed into a new project, imported from a file compiled under
 * strict TypeScript (skipLibCheck off: qsnap's own .d.ts files are checked too), and one
 * checkpoint/revert run; then docs/harness.md's vitest example (global set-up, a clone per
 * worker) run by vitest in a project of its own. The tarball is small: no build caches, no guest
 * binaries.
 *
 * About a minute (tsc twice on a shared host): `make test-package`, or QSNAP_TEST_PACKAGE=1.
 */
import { execFile } from 'node:child_process';
import { cpSync, mkdirSync, mkdtempSync, readdirSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { hasQemu, ROOT } from '../support/env.js';

const enabled = process.env['QSNAP_TEST_PACKAGE'] === '1';
const exec = promisify(execFile);

/** Never throws: status and output, like spawnSync, without blocking vitest's worker. */
async function run(
  cmd: string,
  args: string[],
  cwd: string,
  env: NodeJS.ProcessEnv = process.env,
): Promise<{ status: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await exec(cmd, args, { cwd, env, encoding: 'utf8', maxBuffer: 64 * 2 ** 20 });
    return { status: 0, stdout, stderr };
  } catch (err) {
    const e = err as { code?: number; stdout?: string; stderr?: string };
    return {
      status: typeof e.code === 'number' ? e.code : 1,
      stdout: e.stdout ?? '',
      stderr: e.stderr ?? String(err),
    };
  }
}

const PROJECT = join(ROOT, 'test/harness/fixtures/package-project');
const VITEST_PROJECT = join(ROOT, 'test/harness/fixtures/vitest-project');
/** Terminal colours (vitest colours its output even into a pipe when its parent did). */
const ANSI = new RegExp(`${String.fromCharCode(27)}\\[[0-9;]*m`, 'g');

/** Installs the tarball: with npm when the registry answers, else unpacked as npm would, deps linked from the checkout. */
async function install(project: string, tarball: string): Promise<string> {
  const npm = await run('npm', ['install', '--offline', '--no-audit', '--no-fund', tarball], project);
  if (npm.status === 0) return 'npm install --offline';
  const target = join(project, 'node_modules', 'qsnap');
  mkdirSync(target, { recursive: true });
  await exec('tar', ['-xzf', tarball, '-C', target, '--strip-components=1']);
  const deps = (await run('npm', ['ls', '--omit=dev', '--all', '--parseable'], ROOT)).stdout
    .trim()
    .split('\n')
    .filter((p: string) => p.startsWith(join(ROOT, 'node_modules')));
  for (const dep of deps) symlinkSync(dep, join(project, 'node_modules', basename(dep)));
  return 'unpacked (npm cache has no copy of the dependencies)';
}

describe.skipIf(!enabled || !hasQemu)('the npm package', () => {
  let work: string;
  /** The package as the first test installed it. */
  let installed: string | undefined;
  beforeAll(() => {
    work = mkdtempSync(join(tmpdir(), 'qsnap-package-'));
  });
  afterAll(() => {
    if (work) rmSync(work, { recursive: true, force: true });
  });

  it('packs small from a clean clone, installs, compiles under strict TypeScript and runs a checkpoint/revert', async () => {
    const clone = join(work, 'clone');
    await exec('git', ['clone', '--quiet', ROOT, clone]);
    symlinkSync(join(ROOT, 'node_modules'), join(clone, 'node_modules'));
    const pack = await run('npm', ['pack', '--json', '--pack-destination', work], clone);
    expect(pack.status, pack.stderr).toBe(0);
    const packed = JSON.parse(pack.stdout) as { filename: string; size: number; files: { path: string }[] }[];
    const { filename, size, files } = packed[0]!;
    console.log(`tarball ${filename}: ${(size / 1024).toFixed(0)} KiB, ${files.length} files`);
    expect(size).toBeLessThan(2 * 2 ** 20);
    expect(files.some((f) => f.path === 'dist/index.d.ts')).toBe(true);
    expect(files.filter((f) => f.path.includes('cache/') || f.path.endsWith('.deb'))).toEqual([]);

    const project = join(work, 'project');
    cpSync(PROJECT, project, { recursive: true });
    writeFileSync(
      join(project, 'package.json'),
      '{ "name": "first-suite", "private": true, "type": "module" }\n',
    );
    const how = await install(project, join(work, filename));
    console.log(`installed: ${how}`);
    const typesNode = join(project, 'node_modules', '@types');
    mkdirSync(typesNode, { recursive: true });
    symlinkSync(join(ROOT, 'node_modules/@types/node'), join(typesNode, 'node'));
    const tsc = await run(join(ROOT, 'node_modules/.bin/tsc'), ['-p', 'tsconfig.json'], project);
    expect(tsc.stdout + tsc.stderr, 'strict TypeScript').toBe('');
    expect(readdirSync(join(project, 'out'))).toContain('suite.js');
    const suite = await run(process.execPath, [join(project, 'out/suite.js')], project);
    expect(suite.status, suite.stderr).toBe(0);
    const [result, closed] = suite.stdout
      .trim()
      .split('\n')
      .map((l: string) => JSON.parse(l) as Record<string, unknown>);
    expect(result).toMatchObject({ changed: 0x42, reset: 0x21, state: 'running' });
    expect(closed).toEqual({ closedCode: 'QSNAP_MACHINE_CLOSED' });
    installed = join(project, 'node_modules', 'qsnap');
  });

  it("runs docs/harness.md's vitest example: a global set-up's checkpoint, a clone per worker", async () => {
    expect(installed, 'the package installed by the test above').toBeDefined();
    const project = join(work, 'vitest-project');
    cpSync(VITEST_PROJECT, project, { recursive: true });
    writeFileSync(
      join(project, 'package.json'),
      '{ "name": "my-suite", "private": true, "type": "module" }\n',
    );
    mkdirSync(join(project, 'node_modules'));
    symlinkSync(installed!, join(project, 'node_modules', 'qsnap'));
    symlinkSync(join(ROOT, 'node_modules/vitest'), join(project, 'node_modules', 'vitest'));
    const vitest = await run(
      process.execPath,
      [join(ROOT, 'node_modules/vitest/vitest.mjs'), 'run'],
      project,
    );
    const output = (vitest.stdout + vitest.stderr).replace(ANSI, '');
    expect(vitest.status, output).toBe(0);
    expect(output).toMatch(/Tests\s+4 passed/);
    const clones = [...output.matchAll(/CLONE ([ab]) (\d+) (\S+)/g)].map((m) => ({
      file: m[1],
      pid: Number(m[2]),
      qmp: m[3],
    }));
    expect(clones.map((c) => c.file).sort(), output).toEqual(['a', 'b']);
    expect(clones[0]!.pid, 'each worker its own QEMU').not.toBe(clones[1]!.pid);
    expect(clones[0]!.qmp, 'and its own QMP socket').not.toBe(clones[1]!.qmp);
    for (const { pid } of clones) expect(() => process.kill(pid, 0), `QEMU ${pid} left running`).toThrow();
  });
});

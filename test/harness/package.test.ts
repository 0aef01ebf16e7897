/**
 * The package as a user gets it: `npm pack` from a clean clone of this checkout's HEAD (prepack
 * builds dist/), the tarball installed into a new project, imported from a file compiled under
 * strict TypeScript (skipLibCheck off: qsnap's own .d.ts files are checked too), and one
 * checkpoint/revert run. The tarball is small: no build caches, no guest binaries.
 *
 * About a minute (tsc twice on a shared host): `make test-package`, or QSNAP_TEST_PACKAGE=1.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { cpSync, mkdirSync, mkdtempSync, readdirSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { hasQemu, ROOT } from '../support/env.js';

const enabled = process.env['QSNAP_TEST_PACKAGE'] === '1';
const PROJECT = join(ROOT, 'test/harness/fixtures/package-project');

/** Installs the tarball: with npm when the registry answers, else unpacked as npm would, deps linked from the checkout. */
function install(project: string, tarball: string): string {
  const npm = spawnSync('npm', ['install', '--offline', '--no-audit', '--no-fund', tarball], {
    cwd: project,
    encoding: 'utf8',
  });
  if (npm.status === 0) return 'npm install --offline';
  const target = join(project, 'node_modules', 'qsnap');
  mkdirSync(target, { recursive: true });
  execFileSync('tar', ['-xzf', tarball, '-C', target, '--strip-components=1']);
  const deps = execFileSync('npm', ['ls', '--omit=dev', '--all', '--parseable'], {
    cwd: ROOT,
    encoding: 'utf8',
  })
    .trim()
    .split('\n')
    .filter((p) => p.startsWith(join(ROOT, 'node_modules')));
  for (const dep of deps) symlinkSync(dep, join(project, 'node_modules', basename(dep)));
  return 'unpacked (npm cache has no copy of the dependencies)';
}

describe.skipIf(!enabled || !hasQemu)('the npm package', () => {
  const work = mkdtempSync(join(tmpdir(), 'qsnap-package-'));
  afterAll(() => rmSync(work, { recursive: true, force: true }));

  it('packs small from a clean clone, installs, compiles under strict TypeScript and runs a checkpoint/revert', () => {
    const clone = join(work, 'clone');
    execFileSync('git', ['clone', '--quiet', ROOT, clone]);
    symlinkSync(join(ROOT, 'node_modules'), join(clone, 'node_modules'));
    const packed = JSON.parse(
      execFileSync('npm', ['pack', '--json', '--pack-destination', work], { cwd: clone, encoding: 'utf8' }),
    ) as { filename: string; size: number; files: { path: string }[] }[];
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
    const how = install(project, join(work, filename));
    console.log(`installed: ${how}`);
    const typesNode = join(project, 'node_modules', '@types');
    mkdirSync(typesNode, { recursive: true });
    symlinkSync(join(ROOT, 'node_modules/@types/node'), join(typesNode, 'node'));
    const tsc = spawnSync(join(ROOT, 'node_modules/.bin/tsc'), ['-p', 'tsconfig.json'], {
      cwd: project,
      encoding: 'utf8',
    });
    expect(tsc.stdout + tsc.stderr, 'strict TypeScript').toBe('');
    expect(readdirSync(join(project, 'out'))).toContain('suite.js');
    const run = spawnSync(process.execPath, [join(project, 'out/suite.js')], {
      cwd: project,
      encoding: 'utf8',
    });
    expect(run.status, run.stderr).toBe(0);
    const [result, closed] = run.stdout
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(result).toMatchObject({ changed: 0x42, reset: 0x21, state: 'running' });
    expect(closed).toEqual({ closedCode: 'QSNAP_MACHINE_CLOSED' });
  });
});

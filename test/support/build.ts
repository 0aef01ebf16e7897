/**
 * The CLI tests (and the bench) run the built output in dist/, the way a user does. `make test`
 * builds first; `ensureBuilt` covers a direct `npx vitest run` by building when dist/ is
 * missing or stale, so no test ever runs a stale CLI.
 */
import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync, statSync } from 'node:fs';
import { join, relative } from 'node:path';
import { CLI, ROOT } from './env.js';

/** Every `.ts` file under `dir`, recursively. */
function sources(dir: string): string[] {
  const files: string[] = [];
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) files.push(...sources(path));
    else if (entry.name.endsWith('.ts')) files.push(path);
  }
  return files;
}

/**
 * True when dist/ must be rebuilt: an output is missing, or some output is older than some
 * source (every output must be newer than every source: the oldest `.js` against the newest
 * `.ts`). The outputs are the `.js` files tsc emits for src/'s `.ts` files, so a stale `.js`
 * left in dist/ by a source that was moved or removed does not force a build on every run.
 */
function stale(): boolean {
  if (!existsSync(CLI)) return true;
  const src = join(ROOT, 'src');
  let newestSource = 0;
  let oldestOutput = Number.POSITIVE_INFINITY;
  for (const file of sources(src)) {
    newestSource = Math.max(newestSource, statSync(file).mtimeMs);
    if (file.endsWith('.d.ts')) continue;
    const output = join(ROOT, 'dist', relative(src, file).replace(/\.ts$/, '.js'));
    if (!existsSync(output)) return true;
    oldestOutput = Math.min(oldestOutput, statSync(output).mtimeMs);
  }
  return oldestOutput < newestSource;
}

/**
 * Builds dist/ (`tsc -p tsconfig.build.json`) when it is missing or older than src/. tsc emits
 * even with type errors elsewhere in src/, so one engineer's unfinished file does not stop
 * these tests: only a missing dist/cli/main.js afterwards is fatal.
 */
export function ensureBuilt(): void {
  if (!stale()) return;
  const tsc = spawnSync(join(ROOT, 'node_modules/.bin/tsc'), ['-p', 'tsconfig.build.json'], {
    cwd: ROOT,
    encoding: 'utf8',
  });
  if (!existsSync(CLI)) throw new Error(`could not build ${CLI}: run npx tsc -p tsconfig.build.json`);
  if (tsc.status !== 0)
    console.warn(`tsc -p tsconfig.build.json reported errors:\n${tsc.stdout}${tsc.stderr}`);
}

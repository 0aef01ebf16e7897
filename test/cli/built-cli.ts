/**
 * Runs the built CLI (`node dist/cli/main.js …`) as a child process, the way a user does.
 *
 * `make test` builds dist/ before it runs vitest. When dist/ is missing or older than any
 * file under src/ (a plain `npx vitest run`), `ensureBuilt()` runs the same build
 * (`tsc -p tsconfig.build.json`) first, so these tests never run a stale CLI.
 */
import { execFile } from 'node:child_process';
import { existsSync, readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { CLI, ROOT as REPO } from '../support/env.js';

const run = promisify(execFile);

function newestMtimeMs(dir: string): number {
  let newest = 0;
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) newest = Math.max(newest, newestMtimeMs(path));
    else if (entry.name.endsWith('.ts')) newest = Math.max(newest, statSync(path).mtimeMs);
  }
  return newest;
}

/** Builds dist/ when it is missing or older than src/. */
export async function ensureBuilt(): Promise<void> {
  const stale = !existsSync(CLI) || statSync(CLI).mtimeMs < newestMtimeMs(join(REPO, 'src'));
  if (!stale) return;
  try {
    await run(join(REPO, 'node_modules', '.bin', 'tsc'), ['-p', 'tsconfig.build.json'], { cwd: REPO });
  } catch (err) {
    // tsc still emits on type errors (someone else's work in progress); only a missing CLI is fatal.
    if (!existsSync(CLI)) throw err;
    console.warn(
      `tsc -p tsconfig.build.json reported errors:\n${(err as { stdout?: string }).stdout ?? err}`,
    );
  }
}

export interface CliResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs `qsnap <args>`; never rejects on a non-zero exit. */
export async function qsnap(args: string[], env: NodeJS.ProcessEnv = {}): Promise<CliResult> {
  try {
    const { stdout, stderr } = await run(process.execPath, [CLI, ...args], {
      cwd: REPO,
      env: { ...process.env, QSNAP_DEBUG: '', ...env },
      timeout: 60_000,
    });
    return { code: 0, stdout, stderr };
  } catch (err) {
    const e = err as { code?: unknown; stdout?: string; stderr?: string };
    if (typeof e.code !== 'number') throw err;
    return { code: e.code, stdout: e.stdout ?? '', stderr: e.stderr ?? '' };
  }
}

/**
 * Runs the built CLI (`node dist/cli/main.js …`) as a child process, the way a user does
 * (`ensureBuilt()` in test/support/build.ts builds dist/ first when it is stale).
 */
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { CLI, ROOT as REPO } from '../support/env.js';

const run = promisify(execFile);

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

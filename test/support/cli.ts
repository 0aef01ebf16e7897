/**
 * The built qsnap CLI as a child process (`node dist/cli/main.js …`), the way a user runs it;
 * call `ensureBuilt()` (build.ts) first. The child's environment is the test process's with
 * QSNAP_DEBUG cleared (no stack traces on stderr) and the caller's variables over it.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { expect } from 'vitest';
import { CLI, ROOT } from './env.js';

export interface CliResult {
  code: number | null;
  /** The signal that ended the CLI, if one did. */
  signal?: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  /** stdout parsed as JSON when it is JSON. */
  json: Record<string, unknown> | undefined;
}

export interface CliOptions {
  /** runCli: SIGKILL the CLI after this long (default 120 s); the result then has no code. */
  timeoutMs?: number;
  /** The CLI's working directory (default: the repository root). */
  cwd?: string;
}

export interface CliChild {
  child: ChildProcess;
  done: Promise<CliResult>;
}

function parseJson(text: string): Record<string, unknown> | undefined {
  try {
    return JSON.parse(text) as Record<string, unknown>;
  } catch {
    return undefined;
  }
}

/** Starts `qsnap <args>`; `done` resolves when it has exited and closed its output, never rejects. */
export function spawnCli(args: string[], env: NodeJS.ProcessEnv = {}, options: CliOptions = {}): CliChild {
  const child = spawn(process.execPath, [CLI, ...args], {
    cwd: options.cwd ?? ROOT,
    env: { ...process.env, QSNAP_DEBUG: '', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  child.stdout?.setEncoding('utf8').on('data', (t: string) => {
    stdout += t;
  });
  child.stderr?.setEncoding('utf8').on('data', (t: string) => {
    stderr += t;
  });
  const done = new Promise<CliResult>((resolveDone) => {
    child.once('close', (code, signal) => {
      resolveDone({ code, signal, stdout, stderr, json: parseJson(stdout) });
    });
  });
  return { child, done };
}

/** Runs `qsnap <args>` to the end; never rejects on a non-zero exit. */
export async function runCli(
  args: string[],
  env: NodeJS.ProcessEnv = {},
  options: CliOptions = {},
): Promise<CliResult> {
  const { child, done } = spawnCli(args, env, options);
  const timer = setTimeout(() => child.kill('SIGKILL'), options.timeoutMs ?? 120_000);
  try {
    return await done;
  } finally {
    clearTimeout(timer);
  }
}

/**
 * A CLI error: exit 1, exactly one line on stderr naming the code (after a failure that
 * touched the VM, what was put back follows the code on the same line). Returns the line.
 */
export function expectCliError(result: CliResult, code: string): string {
  expect(result.code, result.stderr).toBe(1);
  const lines = result.stderr.trimEnd().split('\n');
  expect(lines, result.stderr).toHaveLength(1);
  expect(lines[0], result.stderr).toMatch(
    new RegExp(`^qsnap: .+ \\[${code}\\]( \\((during [a-z-]+; )?afterwards: .+\\))?$`),
  );
  return lines[0]!;
}

/**
 * `qsnap <args>` on a terminal (a pseudo-terminal from util-linux `script`), `input` typed into
 * it: what a user at a shell sees, stdout and stderr together as `output`.
 */
export async function runCliOnTerminal(
  args: string[],
  env: NodeJS.ProcessEnv,
  input: string,
): Promise<{ code: number | null; output: string }> {
  const quote = (a: string) => `'${a.replaceAll("'", "'\\''")}'`;
  const command = [process.execPath, CLI, ...args].map(quote).join(' ');
  const child = spawn('script', ['-qec', command, '/dev/null'], {
    cwd: ROOT,
    env: { ...process.env, QSNAP_DEBUG: '', ...env },
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  let output = '';
  child.stdout.setEncoding('utf8').on('data', (t: string) => {
    output += t;
  });
  child.stdin.end(input);
  const timer = setTimeout(() => child.kill('SIGKILL'), 60_000);
  const code = await new Promise<number | null>((resolveCode) => child.once('close', resolveCode));
  clearTimeout(timer);
  return { code, output };
}

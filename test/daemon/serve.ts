/**
 * `qsnap serve` as a child process of a test (the built CLI, the way a user runs it): started on
 * a free loopback port, its log collected, stopped by pid (SIGTERM, then SIGKILL).
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { CLI, ROOT } from '../support/env.js';
import { killPid, waitUntil } from '../support/process.js';

export interface Serve {
  child: ChildProcess;
  pid: number;
  url: string;
  /** Its stdout so far. */
  log(): string;
  /** Resident memory now, in KiB (/proc/<pid>/status VmRSS). */
  rssKiB(): number;
  stop(): Promise<void>;
}

export async function startServe(args: string[], env: NodeJS.ProcessEnv): Promise<Serve> {
  const child = spawn(process.execPath, [CLI, 'serve', '--listen', '127.0.0.1:0', ...args], {
    cwd: ROOT,
    env: { ...process.env, QSNAP_DEBUG: '', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  let err = '';
  child.stdout!.setEncoding('utf8').on('data', (t: string) => {
    out += t;
  });
  child.stderr!.setEncoding('utf8').on('data', (t: string) => {
    err += t;
  });
  const exited = new Promise<number | null>((r) => child.once('exit', (code) => r(code)));
  // A daemon that dies on its own (not by a test's signal) says why in the test's output.
  child.once('exit', (code, signal) => {
    if (code !== 0) console.error(`qsnap serve (pid ${child.pid}) exited ${code ?? signal}:\n${out}${err}`);
  });
  const url = await Promise.race([
    waitUntil(() => /listening (ws:\/\/\S+)/.test(out), 30_000, 'qsnap serve to listen').then(
      () => /listening (ws:\/\/\S+)/.exec(out)![1]!,
    ),
    exited.then((code) => {
      throw new Error(`qsnap serve exited (${code}): ${err}${out}`);
    }),
  ]);
  return {
    child,
    pid: child.pid!,
    url,
    log: () => out + err,
    rssKiB: () => Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${child.pid}/status`, 'utf8'))![1]),
    stop: () => killPid(child.pid!),
  };
}

/** Run `qsnap serve` expecting it to refuse to start; returns its exit code and output. */
export function serveRefuses(
  args: string[],
  env: NodeJS.ProcessEnv,
): Promise<{ code: number | null; out: string }> {
  const child = spawn(process.execPath, [CLI, 'serve', '--listen', '127.0.0.1:0', ...args], {
    cwd: ROOT,
    env: { ...process.env, QSNAP_DEBUG: '', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  child.stdout!.setEncoding('utf8').on('data', (t: string) => (out += t));
  child.stderr!.setEncoding('utf8').on('data', (t: string) => (out += t));
  const timer = setTimeout(() => child.kill('SIGKILL'), 20_000);
  return new Promise((r) =>
    child.once('close', (code) => {
      clearTimeout(timer);
      r({ code, out });
    }),
  );
}

/**
 * Runs a fuzz target under fast-check: a fixed number of executions (make test) or as many as a
 * time budget allows (make fuzz), from a seed that is always printed. A finding is shrunk by
 * fast-check and, with FUZZ_SAVE=1, kept in regressions/ where regressions.test.ts replays it.
 */
import { createHash } from 'node:crypto';
import { mkdirSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import fc from 'fast-check';
import { Finding, type FuzzTarget } from './targets.js';

export const REGRESSIONS = join(dirname(fileURLToPath(import.meta.url)), 'regressions');

/**
 * An execution using more CPU than this is a hang (the inputs are at most a few MiB). CPU time,
 * not wall time: the machine is shared, and a busy neighbour must not pass for a hang.
 */
export const SLOW_EXEC_CPU_MS = 3000;

/**
 * Most targets resolve through microtasks only, so a run of minutes would never give the event
 * loop a turn: vitest's worker could not answer its runner (CI saw "Timeout calling
 * onTaskUpdate" after a 3-minute run). The property yields a macrotask turn this often.
 */
const YIELD_EVERY_MS = 50;

export interface Budget {
  seed: number;
  /** Executions to run; with timeLimitMs, the most to run. */
  numRuns: number;
  timeLimitMs?: number;
}

export interface FuzzStats {
  target: string;
  seed: number;
  executions: number;
  ms: number;
  slowestMs: number;
  /** The slowest input and its outcome (FUZZ_VERBOSE=1 prints it): where a hang would start. */
  slowest?: { input: unknown; outcome: string };
  /** Executions by outcome: 'ok' or the error code (or class) the input was refused with. */
  outcomes: Record<string, number>;
  /** The shrunk input of the first finding, and what it did. */
  finding?: { input: unknown; error: string; saved?: string };
}

/** The budget from the environment: FUZZ_MINUTES spread over `targets`, FUZZ_SEED, else the fixed one. */
export function budgetFromEnv(targets: number, fixed: { seed: number; numRuns: number }): Budget {
  const minutes = Number(process.env['FUZZ_MINUTES'] ?? 0);
  const seed = process.env['FUZZ_SEED']
    ? Number(process.env['FUZZ_SEED'])
    : minutes > 0
      ? Date.now() % 2 ** 31
      : fixed.seed;
  if (minutes > 0) return { seed, numRuns: 2 ** 31 - 1, timeLimitMs: (minutes * 60_000) / targets };
  return { seed, numRuns: fixed.numRuns };
}

export async function fuzz<I>(target: FuzzTarget<I>, budget: Budget): Promise<FuzzStats> {
  const stats: FuzzStats = {
    target: target.name,
    seed: budget.seed,
    executions: 0,
    ms: 0,
    slowestMs: 0,
    outcomes: {},
  };
  const started = performance.now();
  let yielded = started;
  const property = fc.asyncProperty(target.input, async (input) => {
    if (performance.now() - yielded > YIELD_EVERY_MS) {
      await new Promise<void>((resolve) => setImmediate(resolve));
      yielded = performance.now();
    }
    const cpu = process.cpuUsage();
    const t = performance.now();
    const outcome = await target.run(input);
    const ms = performance.now() - t;
    const used = process.cpuUsage(cpu);
    const cpuMs = (used.user + used.system) / 1000;
    stats.executions++;
    if (ms > stats.slowestMs) {
      stats.slowestMs = ms;
      stats.slowest = { input, outcome };
    }
    stats.outcomes[outcome] = (stats.outcomes[outcome] ?? 0) + 1;
    if (cpuMs > SLOW_EXEC_CPU_MS)
      throw new Finding(`one execution used ${Math.round(cpuMs)} ms of CPU (outcome ${outcome})`);
  });
  const details = await fc.check(property, {
    seed: budget.seed,
    numRuns: budget.numRuns,
    ...(budget.timeLimitMs
      ? { interruptAfterTimeLimit: budget.timeLimitMs, markInterruptAsFailure: false }
      : {}),
  });
  stats.ms = performance.now() - started;
  if (details.failed && details.counterexample) {
    const input = details.counterexample[0];
    const error = String(details.errorInstance ?? 'failed');
    console.log(
      `finding in ${target.name} (seed ${budget.seed}, path ${details.counterexamplePath}): ${error}`,
    );
    stats.finding = { input, error };
    if (process.env['FUZZ_SAVE'] === '1')
      stats.finding.saved = saveRegression(target.name, input, error, budget.seed);
  }
  return stats;
}

/** Writes regressions/<target>-<hash>.json (the shrunk input, the error, the seed that found it). */
export function saveRegression(target: string, input: unknown, error: string, seed: number): string {
  mkdirSync(REGRESSIONS, { recursive: true });
  const json = JSON.stringify(input);
  const file = join(
    REGRESSIONS,
    `${target}-${createHash('sha256').update(json).digest('hex').slice(0, 12)}.json`,
  );
  writeFileSync(
    file,
    `${JSON.stringify({ target, found: new Date().toISOString(), seed, error: error.split('\n')[0], input }, null, 2)}\n`,
  );
  return file;
}

export function formatStats(s: FuzzStats): string {
  const outcomes = Object.entries(s.outcomes)
    .sort((a, b) => b[1] - a[1])
    .map(([k, n]) => `${k} ${n}`)
    .join(', ');
  return `fuzz ${s.target}: seed ${s.seed}, ${s.executions} executions in ${(s.ms / 1000).toFixed(1)} s (slowest ${Math.round(s.slowestMs)} ms): ${outcomes}`;
}

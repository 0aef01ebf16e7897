/**
 * `make bench` end to end in its quick mode: scripts/bench.mjs boots one small test guest on
 * QEMU 7.2, measures every path once (savevm/loadvm, virsh save/restore, the background
 * snapshot, qsnap's snapshot, full and lazy restore, a revert) and writes its results. This
 * checks behaviour only — that it completes, that the table has a row per path with a real
 * number in every cell the path measures, that the files are written and that it cleans up
 * after itself — never the performance targets (they belong to the results, docs/benchmarks.md).
 */
import { execFile } from 'node:child_process';
import { mkdtemp, readdir, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureBuilt } from '../support/build.js';
import { canRun, ROOT } from '../support/env.js';
import { isAlive } from '../support/process.js';

const SCRIPT = join(ROOT, 'scripts', 'bench.mjs');
const run = promisify(execFile);

const SAVE_METRICS = [
  'pauseMs',
  'heartbeatDelayMs',
  'totalMs',
  'receiverCpuMs',
  'qemuCpuMs',
  'writtenMiB',
  'allocatedMiB',
  'throughputPct',
  'restoreMs',
];
/** QEMU 7.2 has no mapped-ram: every other path, then qsnap's two other restores. */
const ROWS = ['savevm', 'virsh', 'bgsnap', 'qsnap', 'qsnap-unix', 'qsnap-lazy', 'qsnap-revert'];
const HEADER =
  '| path | pause (STOP→RESUME) (ms) | heartbeat delay (ms) | snapshot time (ms) | receiving CPU (ms) | ' +
  'QEMU CPU (ms) | written (MiB) | allocated (MiB) | workload throughput (% of idle) | restore to running (ms) |';

interface Cell {
  median: number;
  min: number;
  max: number;
  n: number;
  ratio: { median: number } | null;
}
interface BenchResult {
  host: { cpuModel: string; cpus: number; kernel: string };
  qemus: {
    label: string;
    version: string;
    sizes: { memoryMiB: number; qemuPid: number; runs: unknown[] }[];
  }[];
  summary: Record<string, Record<string, Record<string, Record<string, Cell>>>>;
  resultsFile: string;
  svgName: string;
}

async function bench(args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await run(process.execPath, [SCRIPT, ...args], {
      cwd: ROOT,
      timeout: 150_000,
      maxBuffer: 16 * 2 ** 20,
    });
    return { code: 0, stdout, stderr };
  } catch (err) {
    const e = err as { code?: unknown; stdout?: string; stderr?: string };
    if (typeof e.code !== 'number') throw err;
    return { code: e.code, stdout: e.stdout ?? '', stderr: e.stderr ?? '' };
  }
}

describe('bench options', () => {
  it('refuses bad options with usage and exit code 2, before touching anything', async () => {
    for (const args of [
      ['--runs', '0'],
      ['--sizes', '256,x'],
      ['--qemu', '8'],
      ['--quick', '--full'],
    ]) {
      const r = await bench(args);
      expect(r.code, args.join(' ')).toBe(2);
      expect(r.stderr).toMatch(/usage: node scripts\/bench\.mjs/);
      expect(r.stdout).toBe('');
    }
  });
});

describe.skipIf(!canRun)('bench --quick on the test guest (one size, one run, QEMU 7.2)', () => {
  let outDir: string;
  let resultsDir: string;
  let result: { code: number | null; stdout: string; stderr: string };
  let parsed: BenchResult;
  let cells: Record<string, Record<string, Cell>>;

  beforeAll(async () => {
    ensureBuilt();
    outDir = await mkdtemp(join(tmpdir(), 'qsnap-bench-smoke-'));
    resultsDir = await mkdtemp(join(tmpdir(), 'qsnap-bench-results-'));
    // 128 MiB and one revert keep it short.
    result = await bench([
      '--quick',
      '--json',
      '--sizes',
      '128',
      '--reverts',
      '1',
      '--out-dir',
      outDir,
      '--results-dir',
      resultsDir,
    ]);
    if (result.code === 0) {
      parsed = JSON.parse(result.stdout) as BenchResult;
      cells = parsed.summary['7.2']!['128']!;
    }
  }, 170_000);

  afterAll(async () => {
    for (const dir of [outDir, resultsDir]) if (dir) await rm(dir, { recursive: true, force: true });
  });

  it('completes on QEMU 7.2 only and prints only JSON on stdout', () => {
    expect(result.code, result.stderr.slice(-2000)).toBe(0);
    expect(parsed.qemus.map((q) => q.label)).toEqual(['7.2']);
    expect(parsed.qemus[0]!.version).toMatch(/QEMU emulator version 7\.2/);
    expect(parsed.qemus[0]!.sizes.map((s) => s.memoryMiB)).toEqual([128]);
    expect(parsed.qemus[0]!.sizes[0]!.runs).toHaveLength(1);
  });

  it("left the guest consistent: the workload's check passed after the qsnap snapshot and the revert", () => {
    const size = parsed.qemus[0]!.sizes[0]! as unknown as {
      runs: { rows: { qsnap: { guestCheckOk: boolean } } }[];
      revert: { checkOk: boolean };
    };
    expect(size.runs[0]!.rows.qsnap.guestCheckOk).toBe(true);
    expect(size.revert.checkOk).toBe(true);
  });

  it('has a row per path, and a real number in every figure the path measures', () => {
    expect(Object.keys(cells)).toEqual(ROWS);
    for (const row of ROWS) {
      const want =
        row === 'qsnap-lazy' || row === 'qsnap-revert'
          ? ['restoreMs']
          : row === 'qsnap-unix' // save only: the snapshot over a unix socket, not restored
            ? SAVE_METRICS.filter((m) => m !== 'restoreMs')
            : SAVE_METRICS;
      expect(Object.keys(cells[row]!), row).toEqual(want);
      for (const metric of want) {
        const c = cells[row]![metric]!;
        for (const field of ['median', 'min', 'max'] as const) {
          expect(Number.isFinite(c[field]), `${row}.${metric}.${field}`).toBe(true);
        }
        expect(c.n, `${row}.${metric}`).toBe(1);
      }
    }
    // Times, bytes and throughput are positive; the saved state is at least the workload's RAM.
    for (const row of ['savevm', 'virsh', 'bgsnap', 'qsnap']) {
      for (const metric of ['pauseMs', 'totalMs', 'writtenMiB', 'allocatedMiB', 'restoreMs']) {
        expect(cells[row]![metric]!.median, `${row}.${metric}`).toBeGreaterThan(0);
      }
      expect(cells[row]!['allocatedMiB']!.median, row).toBeGreaterThan(32);
    }
  });

  it('gives every figure of qsnap as a ratio to the stock path it replaces', () => {
    const bg = cells['bgsnap']!;
    for (const metric of SAVE_METRICS) {
      const c = cells['qsnap']![metric]!;
      const base = metric === 'restoreMs' ? cells['virsh']![metric]! : bg[metric]!;
      if (base.median > 0) expect(c.ratio!.median, metric).toBeCloseTo(c.median / base.median, 6);
    }
    const loadvm = cells['savevm']!['restoreMs']!.median;
    expect(cells['qsnap-revert']!['restoreMs']!.ratio!.median).toBeCloseTo(
      cells['qsnap-revert']!['restoreMs']!.median / loadvm,
      6,
    );
  });

  it('writes the markdown table with the machine, and the SVG chart', async () => {
    const md = await readFile(parsed.resultsFile, 'utf8');
    expect(md).toContain(`| CPU | ${parsed.host.cpuModel}, ${parsed.host.cpus} cores |`);
    expect(md).toContain(`| kernel | ${parsed.host.kernel} |`);
    expect(md).toMatch(/^\| QEMU 7\.2 \| QEMU emulator version 7\.2/m);
    const table = md.split('\n').filter((l) => l.startsWith('| ') && l.split('|').length === 12);
    expect(table[0]).toBe(HEADER);
    const body = table.slice(1);
    expect(body).toHaveLength(ROWS.length);
    const number = /^-?\d+(\.\d+)?( \(base\)| ×\d+\.\d\d)?$/;
    for (const line of body) {
      const values = line
        .split('|')
        .slice(2, -1)
        .map((c) => c.trim());
      const restoreOnly = /lazy restore|revert/.test(line);
      const saveOnly = /no restore/.test(line);
      values.forEach((v, i) => {
        const last = i === values.length - 1;
        if ((restoreOnly && !last) || (saveOnly && last)) expect(v, line).toBe('–');
        else expect(v, line).toMatch(number);
      });
    }
    const chart = await readFile(join(resultsDir, parsed.svgName), 'utf8');
    expect(chart).toMatch(/^<svg xmlns="http:\/\/www\.w3\.org\/2000\/svg"/);
    for (const title of ['guest pause (ms)', 'snapshot time (ms)', 'restore to running (ms)'])
      expect(chart).toContain(title);
    expect(chart.match(/<circle /g)!.length).toBeGreaterThanOrEqual(4 + 4 + 6);
  });

  it('prints the table on stderr, stops its QEMU and removes everything it wrote', async () => {
    expect(result.stderr).toContain(HEADER);
    expect(isAlive(parsed.qemus[0]!.sizes[0]!.qemuPid)).toBe(false);
    expect(await readdir(outDir)).toEqual([]);
  });
});

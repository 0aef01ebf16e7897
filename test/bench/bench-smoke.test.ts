/**
 * `make bench` end to end in its quick form: scripts/bench-snapshot.mjs boots a small test
 * guest, takes qsnap and QEMU-only snapshots, and prints its result. This checks behaviour
 * only — that it completes, reports a number for every metric, and cleans up after itself —
 * never the performance targets (they belong to the benchmark's own table, docs/benchmarks.md).
 */
import { execFile } from 'node:child_process';
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureBuilt } from '../support/build.js';
import { canRun, ROOT } from '../support/env.js';
import { isAlive } from '../support/process.js';

const SCRIPT = join(ROOT, 'scripts', 'bench-snapshot.mjs');
const run = promisify(execFile);

/** Every metric the bench reports; each must carry numbers for every guest size. */
const METRICS = [
  'downtime_ms',
  'downtime_first_ms',
  'pause_before_migrate_ms',
  'pause_qemu_setup_ms',
  'pause_qemu_downtime_ms',
  'pause_other_ms',
  'baseline_pause_ms',
  'load_avg',
  'thp_mib',
  'total_qsnap_ms',
  'qsnap_before_pause_ms',
  'qsnap_finish_ms',
  'total_devnull_ms',
  'total_file_ms',
  'ratio_total_devnull',
  'ratio_total_file',
  'stream_qsnap_ms',
  'stream_devnull_ms',
  'stream_file_ms',
  'ratio_stream_devnull',
  'ratio_stream_file',
  'cpu_qsnap_ms',
  'cpu_cat_devnull_ms',
  'file_allocated_mib',
  'ram_nonzero_mib',
  'file_overhead_pct',
  'guest_checks_ok',
];

interface Stats {
  median: number;
  min: number;
  max: number;
  n: number;
}
interface BenchRow {
  key: string;
  label: string;
  unit: string;
  target?: string;
  values: Record<string, Stats | null>;
}
interface BenchResult {
  host: { cpus: number; qemu: string; accel: string };
  rows: BenchRow[];
  sizes: { memoryMiB: number; qemuPid: number; runs: Record<string, unknown>[] }[];
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

describe('bench-snapshot options', () => {
  it('refuses bad options with usage and exit code 2, before touching anything', async () => {
    for (const args of [
      ['--runs', '0'],
      ['--sizes', '256,x'],
      ['--thp', 'sometimes'],
    ]) {
      const r = await bench(args);
      expect(r.code, args.join(' ')).toBe(2);
      expect(r.stderr).toMatch(/usage: node scripts\/bench-snapshot\.mjs/);
      expect(r.stdout).toBe('');
    }
  });
});

describe.skipIf(!canRun)('bench-snapshot --quick --json on the test guest', () => {
  let outDir: string;
  let result: { code: number | null; stdout: string; stderr: string };
  let parsed: BenchResult;

  beforeAll(async () => {
    ensureBuilt();
    outDir = await mkdtemp(join(tmpdir(), 'qsnap-bench-smoke-'));
    result = await bench(['--quick', '--json', '--out-dir', outDir]);
    if (result.code === 0) parsed = JSON.parse(result.stdout) as BenchResult;
  }, 170_000);

  afterAll(async () => {
    if (outDir) await rm(outDir, { recursive: true, force: true });
  });

  it('completes and prints only JSON on stdout', () => {
    expect(result.code, result.stderr.slice(-2000)).toBe(0);
    expect(parsed.host.accel).toBe('tcg');
    expect(parsed.host.qemu).toMatch(/QEMU emulator version/);
  });

  it('reports every metric with numbers for the one quick size', () => {
    expect(parsed.sizes.map((s) => s.memoryMiB)).toEqual([256]);
    expect(parsed.rows.map((r) => r.key)).toEqual(METRICS);
    for (const row of parsed.rows) {
      const stats = row.values['256'];
      expect(stats, row.key).not.toBeNull();
      for (const field of ['median', 'min', 'max'] as const) {
        expect(Number.isFinite(stats![field]), `${row.key}.${field}`).toBe(true);
      }
      expect(stats!.min, row.key).toBeLessThanOrEqual(stats!.median);
      expect(stats!.median, row.key).toBeLessThanOrEqual(stats!.max);
      expect(stats!.n, row.key).toBe(row.key === 'downtime_first_ms' ? 1 : 2);
    }
  });

  it('took every kind of snapshot in every run, and the guest stayed consistent', () => {
    const runs = parsed.sizes[0]!.runs;
    expect(runs).toHaveLength(2);
    for (const r of runs)
      expect(Object.keys(r)).toEqual(expect.arrayContaining(['qsnap', 'devnull', 'file']));
    const checks = parsed.rows.find((r) => r.key === 'guest_checks_ok')!.values['256']!;
    expect(checks.median).toBe(2);
  });

  it('prints the table on stderr', () => {
    expect(result.stderr).toMatch(/^\| metric +\| unit +\| 256 MiB/m);
    expect(result.stderr).toMatch(/^\| guest pause, qsnap \(STOP→RESUME\) +\| ms +\| [\d.]+ \[/m);
  });

  it('stops its QEMU and removes everything it wrote', async () => {
    expect(isAlive(parsed.sizes[0]!.qemuPid)).toBe(false);
    expect(await readdir(outDir)).toEqual([]);
  });
});

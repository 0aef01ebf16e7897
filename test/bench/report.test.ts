/**
 * bench/report.mjs on literal results: medians and spreads, ratios taken per run (not the ratio
 * of medians), the revert against loadvm, the markdown cells and the chart's points.
 */
import { describe, expect, it } from 'vitest';
// @ts-expect-error: a plain ES module of the bench, without types
import { markdown, sizeTable, summarize, svg } from '../../bench/report.mjs';

const MiB = 2 ** 20;

function figures(pauseMs: number, totalMs: number, restoreMs: number) {
  return {
    pauseMs,
    heartbeatDelayMs: pauseMs + 1,
    totalMs,
    receiverCpuMs: 100,
    qemuCpuMs: 200,
    writtenBytes: 100 * MiB,
    allocatedBytes: 50 * MiB,
    throughputPct: 90,
    idleMibps: 400,
    restoreMs,
  };
}

/** Three runs where the ratio of the medians (12 / 10) differs from the median of the ratios (2). */
const size = {
  memoryMiB: 256,
  workloadMiB: 64,
  bootSeconds: 2,
  paths: ['savevm', 'virsh', 'bgsnap', 'qsnap'],
  runs: [
    [10, 5],
    [30, 10],
    [12, 12],
  ].map(([qsnap, bg], i) => ({
    run: i + 1,
    rows: {
      savevm: figures(200, 210, 100),
      virsh: figures(150, 160, 400),
      bgsnap: figures(5, bg!, 500),
      qsnap: { ...figures(10, qsnap!, 800), guestCheckOk: true },
      'qsnap-lazy': { restoreMs: 200 },
    },
  })),
  revert: { revertMs: [50, 150, 100], checkOk: true },
};
const qemus = [{ label: '7.2', version: 'QEMU emulator version 7.2.22', sizes: [size] }];

describe('bench report', () => {
  const summary = summarize(qemus);
  const rows = summary['7.2']['256'];

  it('gives median, spread and the median of the per-run ratios to the base path', () => {
    expect(rows.qsnap.totalMs).toMatchObject({ median: 12, min: 10, max: 30, n: 3 });
    expect(rows.qsnap.totalMs.ratio).toMatchObject({ median: 2, min: 1, max: 3 });
    expect(rows.bgsnap.totalMs.ratio.median).toBe(1);
    expect(rows.qsnap.writtenMiB.median).toBe(100);
    expect(rows.qsnap.allocatedMiB.ratio.median).toBe(1);
  });

  it('divides restore times by virsh restore, a revert by loadvm, and has only restore times for those rows', () => {
    expect(rows.qsnap.restoreMs.ratio.median).toBe(2);
    expect(rows['qsnap-lazy'].restoreMs.ratio.median).toBe(0.5);
    expect(Object.keys(rows['qsnap-lazy'])).toEqual(['restoreMs']);
    expect(rows['qsnap-revert'].restoreMs).toMatchObject({ median: 100, min: 50, max: 150, n: 3 });
    expect(rows['qsnap-revert'].restoreMs.ratio.median).toBe(1);
    expect(rows['mapped-ram']).toBeUndefined(); // not a path of this size (QEMU 7.2)
  });

  it('writes one markdown row per path with value, spread and ratio', () => {
    const table = sizeTable(rows).split('\n');
    expect(table).toHaveLength(2 + 6);
    const qsnap = table.find((l: string) => l.startsWith('| qsnap snapshot'))!;
    expect(qsnap).toContain('| 12.0 [10.0–30.0] ×2.00 |');
    expect(table.find((l: string) => l.startsWith('| background snapshot'))).toContain('(base)');
    const doc = markdown(
      {
        command: 'node scripts/bench.mjs',
        mode: 'default',
        date: '2026-12-02T20:00:00.000Z',
        svgName: 'x.svg',
        options: { sizes: [256], runs: 3, reverts: 3 },
        host: {
          cpuModel: 'CPU X',
          cpus: 2,
          memoryMiB: 24_000,
          kernel: 'Linux 6',
          node: 'v20',
          thp: { enabled: 'madvise', defrag: 'madvise' },
          loadAvgStart: [1, 1, 1],
          loadAvgEnd: [2, 2, 2],
        },
        qemus,
      },
      summary,
    );
    expect(doc).toContain('| CPU | CPU X, 2 cores |');
    expect(doc).toContain('| snapshot time, qsnap / background snapshot → file | ≤ 1.10× | 2.00× ✗ |');
    expect(doc).toContain(
      '| reverts per second (Machine.revert, lazy, warm spare ready) | ≥ 20/s | 10.0/s ✗ |',
    );
    expect(doc).toContain('reverts per second: 10.0');
  });

  it('draws a point per path, size and panel', () => {
    const chart = svg(qemus, summary);
    // pause and snapshot time: 4 save paths; restore: 4 + lazy + revert.
    expect(chart.match(/<circle /g)).toHaveLength(4 + 4 + 6);
    expect(chart).toContain('qsnap snapshot, full restore: 12.0');
  });
});

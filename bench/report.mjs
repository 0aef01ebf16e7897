// The bench's results as numbers (summarize), a markdown table (markdown) and an SVG chart
// (svg) of pause, snapshot time and restore time against RAM size. No I/O here.

const MiB = 2 ** 20;

/** The table's rows: every save path, then qsnap's other restores. `base` is the stock path a row's figures are divided by. */
export const ROWS = [
  { id: 'savevm', label: 'HMP savevm / loadvm', restoreLabel: 'loadvm' },
  { id: 'virsh', label: 'stop + migrate to file, -incoming (virsh save/restore)' },
  { id: 'mapped-ram', label: 'file: + mapped-ram + multifd (QEMU ≥ 9.0)' },
  { id: 'bgsnap', label: 'background snapshot → exec:cat file' },
  { id: 'qsnap', label: 'qsnap snapshot, full restore' },
  { id: 'qsnap-unix', label: 'qsnap snapshot over a unix socket (no restore)' },
  { id: 'qsnap-lazy', label: 'qsnap lazy restore', restoreOnly: true },
  {
    id: 'qsnap-revert',
    label: 'qsnap Machine.revert (lazy, warm spare)',
    restoreOnly: true,
    restoreBase: 'savevm',
  },
];

/** Save figures are divided by the primitive's; restore times by virsh restore's (a revert by loadvm's). */
const SAVE_BASE = 'bgsnap';
const RESTORE_BASE = 'virsh';

export const METRICS = [
  { key: 'pauseMs', label: 'pause (STOP→RESUME)', unit: 'ms' },
  { key: 'heartbeatDelayMs', label: 'heartbeat delay', unit: 'ms' },
  { key: 'totalMs', label: 'snapshot time', unit: 'ms' },
  { key: 'receiverCpuMs', label: 'receiving CPU', unit: 'ms' },
  { key: 'qemuCpuMs', label: 'QEMU CPU', unit: 'ms' },
  { key: 'writtenMiB', label: 'written', unit: 'MiB', of: (r) => r.writtenBytes / MiB },
  { key: 'allocatedMiB', label: 'allocated', unit: 'MiB', of: (r) => r.allocatedBytes / MiB },
  { key: 'throughputPct', label: 'workload throughput', unit: '% of idle' },
  { key: 'restoreMs', label: 'restore to running', unit: 'ms', restore: true },
];

export function stats(values) {
  const v = values.filter((x) => typeof x === 'number' && Number.isFinite(x)).sort((a, b) => a - b);
  if (!v.length) return null;
  const mid = v.length >> 1;
  const median = v.length % 2 ? v[mid] : (v[mid - 1] + v[mid]) / 2;
  return { median, min: v[0], max: v[v.length - 1], n: v.length };
}

const figureOf = (metric, figures) =>
  figures === undefined ? undefined : metric.of ? metric.of(figures) : figures[metric.key];

/** One row's values of one metric, one per run (the revert row: one per revert). */
function samples(size, row, metric) {
  if (row.id === 'qsnap-revert') return metric.restore ? size.revert.revertMs : [];
  return size.runs.map((run) => figureOf(metric, run.rows[row.id]));
}

/** Per-run ratios to the base row of the same run; a revert against the size's median loadvm. */
function ratios(size, row, metric) {
  const base = metric.restore ? (row.restoreBase ?? RESTORE_BASE) : SAVE_BASE;
  if (row.id === 'qsnap-revert') {
    const loadvm = stats(size.runs.map((run) => figureOf(metric, run.rows[base])))?.median;
    return loadvm > 0 ? size.revert.revertMs.map((ms) => ms / loadvm) : [];
  }
  return size.runs.map((run) => {
    const a = figureOf(metric, run.rows[row.id]);
    const b = figureOf(metric, run.rows[base]);
    return a === undefined || !(b > 0) ? undefined : a / b;
  });
}

/** {qemuLabel: {memoryMiB: {rowId: {metricKey: {median, min, max, n, ratio}}}}} for the rows each size has. */
export function summarize(qemus) {
  const out = {};
  for (const q of qemus) {
    out[q.label] = {};
    for (const size of q.sizes) {
      const rows = {};
      for (const row of ROWS) {
        if (!row.restoreOnly && !size.paths.includes(row.id)) continue;
        const cells = {};
        for (const metric of METRICS) {
          if (row.restoreOnly && !metric.restore) continue;
          const s = stats(samples(size, row, metric));
          if (!s) continue;
          cells[metric.key] = { ...s, ratio: stats(ratios(size, row, metric)) };
        }
        rows[row.id] = cells;
      }
      out[q.label][size.memoryMiB] = rows;
    }
  }
  return out;
}

export function formatNumber(n) {
  if (Math.abs(n) >= 1000) return n.toFixed(0);
  if (Math.abs(n) >= 100) return n.toFixed(0);
  if (Math.abs(n) >= 10) return n.toFixed(1);
  return n.toFixed(2);
}

function cell(c, isBase) {
  if (!c) return '–';
  const value =
    c.n > 1
      ? `${formatNumber(c.median)} [${formatNumber(c.min)}–${formatNumber(c.max)}]`
      : formatNumber(c.median);
  if (isBase) return `${value} (base)`;
  return c.ratio ? `${value} ×${c.ratio.median.toFixed(2)}` : value;
}

/** The markdown of one QEMU × size: rows are paths, columns the metrics. */
export function sizeTable(rows) {
  const header = ['path', ...METRICS.map((m) => `${m.label} (${m.unit})`)];
  const lines = [`| ${header.join(' | ')} |`, `|${header.map(() => '---').join('|')}|`];
  for (const row of ROWS) {
    const cells = rows[row.id];
    if (!cells) continue;
    const values = METRICS.map((m) => {
      const base = m.restore ? (row.restoreBase ?? RESTORE_BASE) : SAVE_BASE;
      return cell(cells[m.key], row.id === base && !row.restoreOnly);
    });
    lines.push(`| ${row.label} | ${values.join(' | ')} |`);
  }
  return lines.join('\n');
}

/** Issue 11's goals, each from the figures above: [label, goal, value of a size's rows, met]. */
const GOALS = [
  {
    label: 'snapshot time, qsnap / background snapshot → file',
    goal: '≤ 1.10×',
    of: (rows) => rows.qsnap?.totalMs?.ratio?.median,
    format: (v) => `${v.toFixed(2)}×`,
    met: (v) => v <= 1.1,
  },
  {
    label: 'receiving CPU, qsnap / cat',
    goal: '≤ 2×',
    of: (rows) => rows.qsnap?.receiverCpuMs?.ratio?.median,
    format: (v) => `${v.toFixed(2)}×`,
    met: (v) => v <= 2,
  },
  {
    label: 'full restore, qsnap / stock -incoming exec:cat',
    goal: '≤ 1.0×',
    of: (rows) => rows.qsnap?.restoreMs?.ratio?.median,
    format: (v) => `${v.toFixed(2)}×`,
    met: (v) => v <= 1,
  },
  {
    label: 'full restore, qsnap / mapped-ram restore',
    goal: '≤ 1.0×',
    of: (rows) =>
      rows['mapped-ram'] ? rows.qsnap?.restoreMs?.median / rows['mapped-ram'].restoreMs?.median : undefined,
    format: (v) => `${v.toFixed(2)}× (of medians)`,
    met: (v) => v <= 1,
  },
  {
    label: 'lazy restore, command to guest running',
    goal: '≤ 100 ms',
    of: (rows) => rows['qsnap-lazy']?.restoreMs?.median,
    format: (v) => `${formatNumber(v)} ms`,
    met: (v) => v <= 100,
  },
  {
    label: 'reverts per second (Machine.revert, lazy, warm spare ready)',
    goal: '≥ 20/s',
    of: (rows) => 1000 / rows['qsnap-revert']?.restoreMs?.median,
    format: (v) => `${v.toFixed(1)}/s`,
    met: (v) => v >= 20,
  },
  {
    label: 'guest pause, qsnap (later snapshots: every path runs before it in run 1)',
    goal: '≤ 10 ms p50',
    of: (rows) => rows.qsnap?.pauseMs?.median,
    format: (v) => `${formatNumber(v)} ms`,
    met: (v) => v <= 10,
  },
];

function goalsTable(q, summary) {
  const sizes = q.sizes.map((s) => s.memoryMiB);
  const lines = [
    `| goal (QEMU ${q.label}) | target | ${sizes.map((m) => `${m} MiB`).join(' | ')} |`,
    `|---|---|${sizes.map(() => '---').join('|')}|`,
  ];
  for (const g of GOALS) {
    const cells = sizes.map((m) => {
      const v = g.of(summary[q.label][m]);
      return Number.isFinite(v) ? `${g.format(v)} ${g.met(v) ? '✓' : '✗'}` : '–';
    });
    if (cells.every((c) => c === '–')) continue;
    lines.push(`| ${g.label} | ${g.goal} | ${cells.join(' | ')} |`);
  }
  return lines.join('\n');
}

/** The whole results document: the machine, how to read it, one table per QEMU and size. */
export function markdown(result, summary) {
  const { host } = result;
  const out = [
    `# qsnap benchmark, ${result.date.slice(0, 10)}`,
    '',
    `\`${result.command}\` — ${result.mode}: sizes ${result.options.sizes.join(', ')} MiB, ${result.options.runs} run(s) each, ${result.options.reverts} reverts per size.`,
    '',
    '| machine | |',
    '|---|---|',
    `| CPU | ${host.cpuModel}, ${host.cpus} cores |`,
    `| memory | ${(host.memoryMiB / 1024).toFixed(1)} GiB |`,
    `| kernel | ${host.kernel} |`,
    ...result.qemus.map((q) => `| QEMU ${q.label} | ${q.version} |`),
    `| Node | ${host.node} |`,
    `| THP | enabled=${host.thp.enabled} defrag=${host.thp.defrag} |`,
    `| load average (1, 5, 15 min) | ${host.loadAvgStart.join(' ')} at the start, ${host.loadAvgEnd.join(' ')} at the end |`,
    '',
    'Each cell: median [min–max] over the runs, then ×ratio: the median of the per-run ratios to the',
    'stock path it replaces, measured in the same run on the same guest — save figures against the',
    'background snapshot → exec:cat file (the primitive qsnap builds on), restore times against',
    'virsh restore (stock `-incoming "exec:cat FILE"`), a revert against loadvm. The guest runs its',
    'workload (memory and a disk ring) at full speed throughout; TCG, 1 vCPU. See docs/benchmarks.md',
    '("The benchmark suite") for what each column measures.',
    '',
    '![pause, snapshot time and restore time against RAM size](' + result.svgName + ')',
    '',
    "## Issue 11's goals",
    '',
    'Medians of the tables below (✓ met, ✗ missed). The snapshot ratio is against the background',
    "snapshot into a file on the same filesystem (the issue's own figure was against /dev/null).",
  ];
  for (const q of result.qemus) out.push('', goalsTable(q, summary));
  for (const q of result.qemus) {
    for (const size of q.sizes) {
      out.push(
        '',
        `## QEMU ${q.label}, ${size.memoryMiB} MiB guest (workload ${size.workloadMiB} MiB)`,
        '',
        sizeTable(summary[q.label][size.memoryMiB]),
        '',
        `Guest booted in ${size.bootSeconds} s; workload check after every qsnap snapshot: ` +
          `${size.runs.filter((r) => r.rows.qsnap?.guestCheckOk).length}/${size.runs.length} passed, ` +
          `after the reverts: ${size.revert.checkOk ? 'passed' : 'FAILED'}; ` +
          `reverts per second: ${(1000 / stats(size.revert.revertMs).median).toFixed(1)} ` +
          `(warm spare ready; back to back ${backToBack(size.revert)}); ` +
          `idle workload ${formatNumber(stats(size.runs.flatMap((r) => Object.values(r.rows).map((x) => x.idleMibps))).median)} MiB/s (median of the idle windows).`,
      );
    }
  }
  return `${out.join('\n')}\n`;
}

/** Reverts in a row, each waiting for its spare to start (older results have none). */
function backToBack(revert) {
  if (!revert.backToBackMs?.length) return 'not measured';
  return `${(1000 / stats(revert.backToBackMs).median).toFixed(1)}/s`;
}

// ---- the chart ----------------------------------------------------------------------------

const COLORS = {
  savevm: '#8c564b',
  virsh: '#d62728',
  'mapped-ram': '#ff7f0e',
  bgsnap: '#7f7f7f',
  qsnap: '#1f77b4',
  'qsnap-lazy': '#2ca02c',
  'qsnap-revert': '#9467bd',
};
const PANELS = [
  { metric: 'pauseMs', title: 'guest pause (ms)' },
  { metric: 'totalMs', title: 'snapshot time (ms)' },
  { metric: 'restoreMs', title: 'restore to running (ms)' },
];
const W = 330;
const H = 260;
const PAD = { left: 52, right: 24, top: 28, bottom: 38 };

const esc = (s) => String(s).replaceAll('&', '&amp;').replaceAll('<', '&lt;').replaceAll('>', '&gt;');

/** Pause, snapshot time and restore time against RAM size: log–log, one line per path and QEMU. */
export function svg(qemus, summary) {
  const sizes = [...new Set(qemus.flatMap((q) => q.sizes.map((s) => s.memoryMiB)))].sort((a, b) => a - b);
  const parts = [];
  PANELS.forEach((panel, i) => {
    const series = [];
    for (const [qi, q] of qemus.entries()) {
      for (const row of ROWS) {
        const points = q.sizes
          .map((s) => ({ x: s.memoryMiB, c: summary[q.label][s.memoryMiB][row.id]?.[panel.metric] }))
          .filter((p) => p.c && p.c.median > 0);
        if (points.length) series.push({ row, dashed: qi > 0, points });
      }
    }
    parts.push(panelSvg(i * W, panel.title, sizes, series));
  });
  const legendRows = ROWS.map(
    (row, i) =>
      `<g transform="translate(${10 + (i % 3) * W},${H + 14 + Math.floor(i / 3) * 16})">` +
      `<line x1="0" y1="-4" x2="18" y2="-4" stroke="${COLORS[row.id]}" stroke-width="2"/>` +
      `<text x="24" y="0">${esc(row.label)}</text></g>`,
  );
  const styles = qemus
    .map(
      (q, i) =>
        `<g transform="translate(${10 + i * 160},${H + 72})"><line x1="0" y1="-4" x2="18" y2="-4" stroke="#333" stroke-width="2"${i ? ' stroke-dasharray="5,3"' : ''}/><text x="24" y="0">QEMU ${esc(q.label)}</text></g>`,
    )
    .join('');
  const width = W * PANELS.length;
  const height = H + 82;
  return [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" font-family="sans-serif" font-size="11">`,
    `<rect width="${width}" height="${height}" fill="white"/>`,
    ...parts,
    ...legendRows,
    styles,
    '</svg>',
    '',
  ].join('\n');
}

function panelSvg(x0, title, sizes, series) {
  const values = series.flatMap((s) => s.points.flatMap((p) => [p.c.min, p.c.max])).filter((v) => v > 0);
  const lo = 10 ** Math.floor(Math.log10(Math.min(...values)));
  const hi = Math.max(10 ** Math.ceil(Math.log10(Math.max(...values))), lo * 10);
  const plotW = W - PAD.left - PAD.right;
  const plotH = H - PAD.top - PAD.bottom;
  const xs = sizes.map((s) => Math.log2(s));
  const [xmin, xmax] = [Math.min(...xs), Math.max(...xs)];
  const px = (mib) =>
    PAD.left + (xmax === xmin ? plotW / 2 : ((Math.log2(mib) - xmin) / (xmax - xmin)) * plotW);
  const py = (v) =>
    PAD.top + plotH - ((Math.log10(Math.max(v, lo)) - Math.log10(lo)) / Math.log10(hi / lo)) * plotH;
  const out = [
    `<g transform="translate(${x0},0)">`,
    `<text x="${PAD.left}" y="16" font-weight="bold">${esc(title)}</text>`,
  ];
  for (let d = lo; d <= hi; d *= 10) {
    out.push(
      `<line x1="${PAD.left}" x2="${W - PAD.right}" y1="${py(d)}" y2="${py(d)}" stroke="#ddd"/>`,
      `<text x="${PAD.left - 4}" y="${py(d) + 4}" text-anchor="end">${d >= 1 ? d : d.toPrecision(1)}</text>`,
    );
  }
  for (const s of sizes) {
    out.push(
      `<line x1="${px(s)}" x2="${px(s)}" y1="${PAD.top}" y2="${PAD.top + plotH}" stroke="#eee"/>`,
      `<text x="${px(s)}" y="${PAD.top + plotH + 14}" text-anchor="middle">${s >= 1024 ? `${s / 1024} GiB` : `${s} MiB`}</text>`,
    );
  }
  out.push(
    `<text x="${PAD.left + plotW / 2}" y="${H - 6}" text-anchor="middle">guest RAM</text>`,
    `<rect x="${PAD.left}" y="${PAD.top}" width="${plotW}" height="${plotH}" fill="none" stroke="#999"/>`,
  );
  for (const { row, dashed, points } of series) {
    const color = COLORS[row.id];
    const d = points.map((p, i) => `${i ? 'L' : 'M'}${px(p.x).toFixed(1)},${py(p.c.median).toFixed(1)}`);
    out.push(
      `<path d="${d.join(' ')}" fill="none" stroke="${color}" stroke-width="1.8"${dashed ? ' stroke-dasharray="5,3"' : ''}/>`,
    );
    for (const p of points) {
      const x = px(p.x).toFixed(1);
      out.push(
        `<line x1="${x}" x2="${x}" y1="${py(p.c.min).toFixed(1)}" y2="${py(p.c.max).toFixed(1)}" stroke="${color}" stroke-opacity="0.5"/>`,
        `<circle cx="${x}" cy="${py(p.c.median).toFixed(1)}" r="2.5" fill="${color}"><title>${esc(`${row.label}: ${formatNumber(p.c.median)}`)}</title></circle>`,
      );
    }
  }
  out.push('</g>');
  return out.join('\n');
}

#!/usr/bin/env node
// `make bench`: the benchmark suite. On one test guest per QEMU and RAM size, with its workload
// rewriting memory and a disk ring at full speed, it measures side by side, in an order rotated
// from run to run, every way to save and restore a running VM:
//   HMP savevm / loadvm                   QEMU's internal qcow2 snapshot
//   stop + migrate to file, -incoming     what virsh save / restore do
//   file: + mapped-ram + multifd          what openQA and libvirt --parallel do (QEMU >= 9.0)
//   background snapshot → exec:cat file   the primitive qsnap builds on
//   qsnap snapshot, full restore, lazy restore, Machine.revert
// and prints one markdown table per QEMU and size (written with an SVG chart to bench/results/).
// bench/paths/ has one module per path, bench/report.mjs the table and the chart;
// docs/benchmarks.md ("The benchmark suite") explains every column.
//
//   node scripts/bench.mjs [--quick | --full] [--sizes 256,1024] [--runs 3] [--reverts 5]
//       [--qemu 7.2,10] [--json] [--out-dir DIR] [--results-dir DIR] [--idle-ms 1000]
//   node scripts/bench.mjs --render FILE.json    (the results files again from a --json output)
//
// Progress goes to stderr; the table to stdout (with --json, stdout is the JSON document only).
// Every QEMU is stopped by pid and every file removed, also on an error or Ctrl-C.
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import { join, relative, resolve } from 'node:path';
import { parseArgs } from 'node:util';

const ROOT = resolve(new URL('..', import.meta.url).pathname);
const DEFAULT_SIZES = [256, 1024, 2048];
const FULL_SIZES = [256, 1024, 2048, 8192];
const MAX_WORKLOAD_MIB = 512;

const USAGE = `usage: node scripts/bench.mjs [options]
  (default)             sizes 256,1024,2048 MiB, 3 runs, QEMU 7.2 and 10 (10 as root only)
  --full                also 8192 MiB, 5 runs
  --quick               one 256 MiB guest, one run, QEMU 7.2 only (make test's smoke run)
  --sizes 256,1024      guest RAM sizes in MiB (the workload rewrites a quarter, at most 512 MiB)
  --runs N              runs per size; each run measures every path once
  --reverts N           Machine.revert calls per size (default: 3, or the runs if more)
  --qemu 7.2,10         which QEMUs (10: Debian 13's, in a chroot; needs root)
  --json                the raw numbers as JSON on stdout
  --out-dir DIR         where the guests and their files go (default: a temp dir; removed)
  --results-dir DIR     where <date>.md, .svg and .json go (default bench/results)
  --render FILE.json    write the results files (and print the tables) of an earlier --json
                        output again, with this checkout's report code; runs no guest
  --idle-ms N           the workload's undisturbed window before each measurement, its
                        throughput reference (default 1000; --quick 500)`;

function fail(message) {
  console.error(`bench: ${message}\n${USAGE}`);
  process.exit(2);
}

function positiveInt(text, what) {
  const n = Number(text);
  if (!Number.isInteger(n) || n <= 0) fail(`${what}: expected a positive integer, got ${text}`);
  return n;
}

function parseOptions(argv) {
  let values;
  try {
    ({ values } = parseArgs({
      args: argv,
      options: {
        quick: { type: 'boolean', default: false },
        full: { type: 'boolean', default: false },
        sizes: { type: 'string' },
        runs: { type: 'string' },
        reverts: { type: 'string' },
        qemu: { type: 'string' },
        json: { type: 'boolean', default: false },
        'out-dir': { type: 'string' },
        'results-dir': { type: 'string' },
        'idle-ms': { type: 'string' },
        render: { type: 'string' },
        help: { type: 'boolean', short: 'h', default: false },
      },
    }));
  } catch (err) {
    fail(err.message);
  }
  if (values.help) {
    console.log(USAGE);
    process.exit(0);
  }
  if (values.quick && values.full) fail('--quick and --full exclude each other');
  const mode = values.quick ? 'quick' : values.full ? 'full' : 'default';
  const sizes = values.sizes
    ? values.sizes.split(',').map((s) => positiveInt(s, '--sizes'))
    : mode === 'quick'
      ? [256]
      : mode === 'full'
        ? FULL_SIZES
        : DEFAULT_SIZES;
  const runs = values.runs ? positiveInt(values.runs, '--runs') : { quick: 1, default: 3, full: 5 }[mode];
  const qemus = (values.qemu ?? (mode === 'quick' ? '7.2' : '7.2,10')).split(',');
  for (const q of qemus) if (!['7.2', '10'].includes(q)) fail(`--qemu: 7.2 or 10, not ${q}`);
  return {
    mode,
    sizes,
    runs,
    reverts: values.reverts ? positiveInt(values.reverts, '--reverts') : Math.max(3, runs),
    qemus,
    // QEMU 10 runs from a chroot that only root can set up; asked for by default, skipped then.
    qemu10Explicit: values.qemu !== undefined,
    json: values.json,
    outDir: values['out-dir'] ? resolve(values['out-dir']) : undefined,
    resultsDir: resolve(values['results-dir'] ?? join(ROOT, 'bench', 'results')),
    render: values.render ? resolve(values.render) : undefined,
    idleMs: values['idle-ms'] ? positiveInt(values['idle-ms'], '--idle-ms') : mode === 'quick' ? 500 : 1000,
  };
}

const log = (message) => console.error(message);

// ---- clean-up: everything this run started, undone in reverse order -----------------------

const undo = [];
let cleaning;

function cleanup() {
  cleaning ??= (async () => {
    while (undo.length) {
      try {
        await undo.pop()();
      } catch (err) {
        log(`cleanup: ${err.message}`);
      }
    }
  })();
  return cleaning;
}

// `on`, not `once`: a Machine's own handler stops its QEMU and sends the signal again, which
// must not end the process before the clean-up here is done.
for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => {
    if (cleaning) return;
    log(`\n${signal}: stopping the guests and removing the files`);
    void cleanup().finally(() => process.exit(130));
  });
}

// ---- main ---------------------------------------------------------------------------------

async function benchQemu(options, label, binary, parentDir, benchSize, qemuVersionLine) {
  const version = qemuVersionLine(binary);
  const major = Number(version.match(/version (\d+)\./)?.[1]);
  if (!major) throw new Error(`cannot run ${binary}: ${version}`);
  await mkdir(parentDir, { recursive: true });
  const workDir = await mkdtemp(join(parentDir, 'qb-'));
  undo.push(() => rm(workDir, { recursive: true, force: true }));
  // qsnap's and the Machine's own files go where this QEMU can see them.
  const saved = { TMPDIR: process.env.TMPDIR, QSNAP_STATE_DIR: process.env.QSNAP_STATE_DIR };
  process.env.TMPDIR = workDir;
  process.env.QSNAP_STATE_DIR = join(workDir, 'state');
  const sizes = [];
  try {
    for (const memoryMiB of options.sizes) {
      sizes.push(
        await benchSize({
          qemu: { label, binary, major },
          memoryMiB,
          workloadMiB: Math.min(MAX_WORKLOAD_MIB, Math.floor(memoryMiB / 4)),
          runs: options.runs,
          reverts: options.reverts,
          idleMs: options.idleMs,
          workDir,
          log,
          undo,
        }),
      );
    }
  } finally {
    for (const [k, v] of Object.entries(saved)) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  }
  return { label, binary, version, major, sizes };
}

async function main() {
  const options = parseOptions(process.argv.slice(2));
  if (!existsSync(join(ROOT, 'dist', 'index.js'))) {
    console.error('bench: dist/ is missing; run make build (or make bench, which builds)');
    process.exit(2);
  }
  if (options.render) {
    const result = JSON.parse(await readFile(options.render, 'utf8'));
    await writeResults(result, { ...options, json: false });
    return;
  }
  // dist/ is imported after the options are checked: --help and usage errors work unbuilt.
  const { benchSize } = await import('../bench/run.mjs');
  const { hostInfo, qemuVersionLine } = await import('../bench/lib/host.mjs');
  const host = hostInfo();
  log(
    `qsnap bench (${options.mode}): sizes ${options.sizes.join(', ')} MiB, ${options.runs} run(s), QEMU ${options.qemus.join(', ')}`,
  );
  log(`host: ${host.cpuModel}, ${host.cpus} cores, ${host.kernel}, load ${host.loadAvgStart.join(' ')}`);
  const qemus = [];
  const skipped = [];
  for (const label of options.qemus) {
    if (label === '7.2') {
      qemus.push(
        await benchQemu(
          options,
          label,
          'qemu-system-x86_64',
          options.outDir ?? os.tmpdir(),
          benchSize,
          qemuVersionLine,
        ),
      );
      continue;
    }
    if (process.getuid() !== 0) {
      if (options.qemu10Explicit) fail('--qemu 10 needs root (the chroot of scripts/qemu-chroot.sh)');
      skipped.push('QEMU 10 skipped: it runs from a chroot, which needs root');
      log(skipped.at(-1));
      continue;
    }
    const { setupQemu10, WORK } = await import('../bench/lib/qemu10.mjs');
    const wrapper = setupQemu10(undo, log);
    qemus.push(await benchQemu(options, label, wrapper, WORK, benchSize, qemuVersionLine));
  }
  host.loadAvgEnd = os.loadavg().map((l) => +l.toFixed(2));
  const date = new Date().toISOString();
  const result = {
    tool: 'qsnap scripts/bench.mjs',
    command: `node scripts/bench.mjs ${process.argv.slice(2).join(' ')}`.trim(),
    mode: options.mode,
    date,
    host,
    options: { ...options, outDir: options.outDir ?? null },
    skipped,
    qemus,
  };
  await writeResults(result, options);
}

/** bench/results/<date>.md, .svg and .json from a result, and the tables on stdout (stderr with --json). */
async function writeResults(result, options) {
  const { markdown, summarize, svg, sizeTable } = await import('../bench/report.mjs');
  const stamp = result.date.slice(0, 19).replaceAll(':', '').replace('T', '-');
  result.svgName = `${stamp}.svg`;
  const summary = summarize(result.qemus);
  result.summary = summary;
  const doc = markdown(result, summary) + result.skipped.map((s) => `\n${s}.\n`).join('');
  await mkdir(options.resultsDir, { recursive: true });
  const mdFile = join(options.resultsDir, `${stamp}.md`);
  await writeFile(mdFile, doc);
  await writeFile(join(options.resultsDir, result.svgName), svg(result.qemus, summary));
  // The raw figures beside them: `--render` writes the two files again from it.
  if (!options.render) await writeFile(join(options.resultsDir, `${stamp}.json`), JSON.stringify(result));
  log(`\nwritten: ${relative(process.cwd(), mdFile) || mdFile} and ${result.svgName}`);
  result.resultsFile = mdFile;
  const tables = result.qemus
    .flatMap((q) =>
      q.sizes.map((s) => `QEMU ${q.label}, ${s.memoryMiB} MiB\n${sizeTable(summary[q.label][s.memoryMiB])}`),
    )
    .join('\n\n');
  if (options.json) {
    log(`\n${tables}`);
    console.log(JSON.stringify(result, null, 2));
  } else {
    console.log(`\n${tables}`);
  }
}

try {
  await main();
  await cleanup();
} catch (err) {
  console.error(`bench failed: ${err?.stack ?? err}`);
  await cleanup();
  process.exitCode = 1;
}

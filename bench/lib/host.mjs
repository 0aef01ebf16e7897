// The host side of a measurement: what the machine is, and what a process has spent.
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import os from 'node:os';
import { setTimeout as sleep } from 'node:timers/promises';

// /proc/<pid>/stat counts CPU time in clock ticks; USER_HZ is 100 on every Linux build QEMU runs on.
const TICK_MS = 10;

function sysfsChoice(path) {
  try {
    return readFileSync(path, 'utf8').match(/\[(\w[\w+]*)\]/)?.[1];
  } catch {
    return undefined;
  }
}

export function qemuVersionLine(binary) {
  try {
    return execFileSync(binary, ['--version'], { encoding: 'utf8' }).split('\n')[0];
  } catch {
    return 'unknown';
  }
}

/** The machine a result was measured on (goes into the results file). */
export function hostInfo() {
  const cpus = os.cpus();
  return {
    cpuModel: cpus[0]?.model?.trim() ?? 'unknown',
    cpus: cpus.length,
    memoryMiB: Math.round(os.totalmem() / 2 ** 20),
    kernel: `${os.type()} ${os.release()}`,
    node: process.version,
    thp: {
      enabled: sysfsChoice('/sys/kernel/mm/transparent_hugepage/enabled'),
      defrag: sysfsChoice('/sys/kernel/mm/transparent_hugepage/defrag'),
    },
    loadAvgStart: os.loadavg().map((l) => +l.toFixed(2)),
  };
}

async function statFields(pid) {
  const text = await readFile(`/proc/${pid}/stat`, 'utf8');
  return text.slice(text.lastIndexOf(')') + 2).split(' ');
}

/** CPU of a process itself, all its threads (utime + stime), ms. */
export async function processCpuMs(pid) {
  const f = await statFields(pid);
  return (Number(f[11]) + Number(f[12])) * TICK_MS;
}

/** CPU of a process's reaped children (cutime + cstime), ms: an `exec:cat` once QEMU reaped it. */
export async function childrenCpuMs(pid) {
  const f = await statFields(pid);
  return (Number(f[13]) + Number(f[14])) * TICK_MS;
}

/** childrenCpuMs once it moved past `before` (QEMU reaps cat in its cleanup, just after completion). */
export async function reapedChildrenCpuMs(pid, before) {
  const deadline = Date.now() + 500;
  for (;;) {
    const now = await childrenCpuMs(pid);
    if (now > before || Date.now() > deadline) return now;
    await sleep(10);
  }
}

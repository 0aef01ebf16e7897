import { readdirSync, readFileSync } from 'node:fs';

/**
 * A process named so that a reused pid is never mistaken for it: its pid and its start time
 * (field 22 of /proc/<pid>/stat, clock ticks since boot). Intent records name their owner this
 * way, run directories their QEMU, and the store the QEMU that holds a disk layer.
 */
export interface ProcessIdentity {
  pid: number;
  startTime: string;
}

/** Start time of a live process, or undefined when there is no process with that pid. */
export function processStartTime(pid: number): string | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // Field 22; the command name (field 2) may contain spaces and parentheses.
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19];
  } catch {
    return undefined;
  }
}

/** The identity of a running process (this one by default); undefined when it has gone. */
export function processIdentity(pid: number = process.pid): ProcessIdentity | undefined {
  const startTime = processStartTime(pid);
  return startTime === undefined ? undefined : { pid, startTime };
}

/** True while the very process `identity` names runs: same pid and same start time. */
export function isRunning(identity: ProcessIdentity): boolean {
  return processStartTime(identity.pid) === identity.startTime;
}

/** Live processes whose command line contains `text` (e.g. a run directory's path). */
export function pidsMentioning(text: string): number[] {
  const pids: number[] = [];
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry) || Number(entry) === process.pid) continue;
    try {
      if (readFileSync(`/proc/${entry}/cmdline`, 'latin1').includes(text)) pids.push(Number(entry));
    } catch {
      // exited while we looked
    }
  }
  return pids;
}

/**
 * Whether the kernel still has a process `pid` (a zombie counts). Only for a child this process
 * started and has not reaped, where pid reuse is impossible; anything else goes by identity.
 */
export function childExists(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

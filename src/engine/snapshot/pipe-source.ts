import { closeSync, constants, fstatSync, openSync, readFileSync, statSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';

/**
 * The stream over a pipe instead of a unix socket. QEMU 7.2's background snapshot flushes per
 * page; into a unix socket that makes its migration 2–4× longer than into `exec:`'s pipe, whatever
 * the reader costs (docs/benchmarks.md). QEMU has no `migrate` to a pipe it is given (`fd:` needs
 * SCM_RIGHTS, which Node cannot send), so qsnap borrows the one `exec:` makes: QEMU runs a
 * placeholder with the pipe's read end as its stdin, the placeholder writes its pid into the
 * stream directory and sleeps, and qsnap opens `/proc/<pid>/fd/0` — on Linux a new reader of
 * the same pipe. Once the readers that matter hold it (qsnap, and for a background snapshot the
 * drain guard), the placeholder is killed: QEMU's end of the migration waits for its child to
 * exit (io/channel-command.c, qio_channel_command_close), so it must not be left sleeping.
 */

/** The placeholder's sleep: only reached when nobody ever opens the pipe (then QEMU sees EPIPE). */
const PLACEHOLDER_SECONDS = 60;

/** How often the pid file is looked for while QEMU starts the placeholder. */
const POLL_MS = 1;

/**
 * How long the placeholder may take to write its pid. QEMU has forked it before `migrate`
 * returns; it takes milliseconds (sh, perl, echo), seconds on a host under heavy load.
 */
export const PLACEHOLDER_START_MS = 15_000;

/**
 * The pipe's size: 1 MiB (Linux's default pipe-max-size) instead of 64 KiB, so that qsnap can
 * read it in large pieces while QEMU goes on writing (receiver.ts letPipeFill). Set by the
 * placeholder with perl (Debian's perl-base is essential; F_SETPIPE_SZ = 1031), since neither
 * sh nor Node has fcntl; without perl, or above the limit, the pipe keeps its size.
 */
const PIPE_BYTES = 1024 * 1024;
const F_SETPIPE_SZ = 1031;

/** The placeholder's pid file, in the stream directory. */
export const PLACEHOLDER_PID_FILE = 'placeholder.pid';

/** The shell command of `migrate exec:` (QEMU runs it with /bin/sh -c). */
export function placeholderCommand(pidFile: string): string {
  return (
    `perl -e 'fcntl(STDIN, ${F_SETPIPE_SZ}, ${PIPE_BYTES})' 2>/dev/null; ` +
    `echo $$ > ${shellQuote(pidFile)} && exec sleep ${PLACEHOLDER_SECONDS}`
  );
}

export function shellQuote(s: string): string {
  return `'${s.replaceAll("'", `'\\''`)}'`;
}

/** qsnap's own reader of QEMU's pipe, and the placeholder holding it open. */
export interface HeldPipe {
  fd: number;
  placeholderPid: number;
  /** The pipe's inode: the placeholder is killed only while its stdin is still this pipe. */
  ino: number;
}

/**
 * Open the pipe behind the placeholder whose pid `pidFile` will hold. Throws when none came
 * within `timeoutMs`, or the pid file names a process whose stdin is not a pipe. There is no
 * giving up earlier: a placeholder nobody kills holds the pipe open, and QEMU's migration (even
 * a cancelled one) stays blocked on it for its whole sleep, so whoever started one opens it.
 */
export async function openPlaceholderPipe(
  pidFile: string,
  timeoutMs = PLACEHOLDER_START_MS,
): Promise<HeldPipe> {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    const pid = readPid(pidFile);
    if (pid !== undefined) return openStdinPipe(pid);
    if (performance.now() > deadline)
      throw new Error(`QEMU's migration placeholder wrote no pid within ${timeoutMs} ms`);
    await sleep(POLL_MS);
  }
}

/**
 * Kill the placeholder a dead qsnap left, found by its pid file: only a process whose stdin is
 * a pipe and that runs `sleep` (a reused pid is neither, or is not ours to kill anyway).
 * True when one was killed.
 */
export function killLeftPlaceholder(pidFile: string): boolean {
  let pid: number | undefined;
  try {
    pid = readPid(pidFile);
  } catch {
    return false;
  }
  if (pid === undefined) return false;
  try {
    const argv = readFileSync(`/proc/${pid}/cmdline`, 'latin1').split('\0');
    if (argv[0] !== 'sleep' || !statSync(`/proc/${pid}/fd/0`).isFIFO()) return false;
    process.kill(pid, 'SIGKILL');
    return true;
  } catch {
    return false;
  }
}

function readPid(pidFile: string): number | undefined {
  let text: string;
  try {
    text = readFileSync(pidFile, 'utf8');
  } catch {
    return undefined;
  }
  // The shell's echo is one write; until its newline is there the file is still being written.
  if (!text.endsWith('\n')) return undefined;
  const pid = Number(text.trim());
  if (!Number.isSafeInteger(pid) || pid <= 1)
    throw new Error(`the migration placeholder wrote no pid: ${text}`);
  return pid;
}

function openStdinPipe(pid: number): HeldPipe {
  const fd = openSync(`/proc/${pid}/fd/0`, constants.O_RDONLY | constants.O_NONBLOCK);
  const stat = fstatSync(fd);
  if (!stat.isFIFO()) {
    closeSync(fd);
    throw new Error(`the migration placeholder (pid ${pid}) does not hold a pipe`);
  }
  return { fd, placeholderPid: pid, ino: stat.ino };
}

/** Kill the placeholder if it still holds the pipe (never another process that took its pid). */
export function killPlaceholder(pipe: HeldPipe): void {
  try {
    if (statSync(`/proc/${pipe.placeholderPid}/fd/0`).ino !== pipe.ino) return;
    process.kill(pipe.placeholderPid, 'SIGKILL');
  } catch {
    // Gone already.
  }
}

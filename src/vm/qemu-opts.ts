/**
 * QEMU's option-string syntax (`-drive file=a,,b.img,if=virtio`): comma-separated
 * `key=value` pairs, a doubled comma is a literal comma, and some options take a
 * leading implied key (`-qmp unix:/p,server=on` → {'': 'unix:/p', server: 'on'}).
 * (QEMU: util/qemu-option.c, get_opt_value / opts_do_parse.)
 */

export interface QemuOpts {
  /** The leading value without a key (implied key), if any. */
  implied?: string;
  /** key → value, in order; a bare `key` (no `=`) maps to 'on'. */
  pairs: [string, string][];
}

function splitEscaped(text: string): string[] {
  const parts: string[] = [];
  let current = '';
  for (let i = 0; i < text.length; i++) {
    const ch = text[i];
    if (ch === ',') {
      if (text[i + 1] === ',') {
        current += ',';
        i++;
        continue;
      }
      parts.push(current);
      current = '';
      continue;
    }
    current += ch;
  }
  parts.push(current);
  return parts;
}

export function parseQemuOpts(text: string, impliedKey?: string): QemuOpts {
  const parts = splitEscaped(text);
  const opts: QemuOpts = { pairs: [] };
  // QEMU looks at the raw text: the first part is implied unless '=' comes before any ','
  // (so `unix:/a,,b=c` is one implied value).
  const firstIsImplied = impliedKey !== undefined && text[text.search(/[=,]/)] !== '=';
  parts.forEach((part, index) => {
    const eq = part.indexOf('=');
    if (index === 0 && firstIsImplied) {
      opts.implied = part;
      return;
    }
    if (part === '') return;
    if (eq < 0) opts.pairs.push([part, 'on']);
    else opts.pairs.push([part.slice(0, eq), part.slice(eq + 1)]);
  });
  return opts;
}

const escapeCommas = (value: string) => value.replaceAll(',', ',,');

export function formatQemuOpts(opts: QemuOpts): string {
  const parts: string[] = [];
  if (opts.implied !== undefined) parts.push(escapeCommas(opts.implied));
  for (const [key, value] of opts.pairs) parts.push(`${key}=${escapeCommas(value)}`);
  return parts.join(',');
}

export function getOpt(opts: QemuOpts, key: string): string | undefined {
  for (let i = opts.pairs.length - 1; i >= 0; i--) {
    const pair = opts.pairs[i]!;
    if (pair[0] === key) return pair[1];
  }
  return undefined;
}

export function setOpt(opts: QemuOpts, key: string, value: string): QemuOpts {
  const pairs = opts.pairs.filter(([k]) => k !== key);
  pairs.push([key, value]);
  return { ...opts, pairs };
}

/** Shorthand for options built by qsnap itself. */
export function opts(pairs: Record<string, string | number | boolean | undefined>, implied?: string): string {
  const list: [string, string][] = [];
  for (const [key, value] of Object.entries(pairs)) {
    if (value === undefined) continue;
    list.push([key, typeof value === 'boolean' ? (value ? 'on' : 'off') : String(value)]);
  }
  return formatQemuOpts(implied === undefined ? { pairs: list } : { implied, pairs: list });
}

/** A QEMU argv as a list of (option, value) pairs; flags without a value get `undefined`. */
export interface ArgvEntry {
  option: string;
  value: string | undefined;
}

/** Options of qemu-system-* that take no argument (qemu-options.hx); all others take one. */
const FLAG_OPTIONS = new Set([
  '-S',
  '-daemonize',
  '-nographic',
  '-no-reboot',
  '-no-shutdown',
  '-nodefaults',
  '-no-user-config',
  '-enable-kvm',
  '-no-hpet',
  '-no-acpi',
  '-snapshot',
  '-s',
  '-full-screen',
  '-no-fd-bootchk',
  '-win2k-hack',
  '-no-quit',
  '-only-migratable',
  '-preconfig',
  '-version',
  '-help',
  '-h',
  '-enable-fips',
  '-alt-grab',
  '-ctrl-grab',
  '-semihosting',
  // Flags of QEMU 7.2 found by probing it (test/vm/qemu-opts.test.ts); -one-insn-per-tb is
  // -singlestep's name from QEMU 8.1 on.
  '-usb',
  '-mem-prealloc',
  '-singlestep',
  '-portrait',
  '-audio-help',
  '-async-teardown',
  '-enable-sync-profile',
  '-xen-attach',
  '-xen-domid-restrict',
  '-one-insn-per-tb',
]);

export function splitArgv(argv: readonly string[]): ArgvEntry[] {
  const entries: ArgvEntry[] = [];
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    // QEMU accepts both -opt and --opt.
    const option = arg.startsWith('--') ? arg.slice(1) : arg;
    if (!option.startsWith('-') || FLAG_OPTIONS.has(option) || i + 1 >= argv.length) {
      entries.push({ option, value: undefined });
      continue;
    }
    entries.push({ option, value: argv[i + 1] });
    i++;
  }
  return entries;
}

export function joinArgv(entries: readonly ArgvEntry[]): string[] {
  const argv: string[] = [];
  for (const { option, value } of entries) {
    argv.push(option);
    if (value !== undefined) argv.push(value);
  }
  return argv;
}

import { asQsnapError } from '../errors.js';

export interface Output {
  json: boolean;
  /** Writes human text to stdout (suppressed with --json). */
  text(line: string): void;
  /** The one JSON document of a --json run. */
  result(value: unknown): void;
}

/**
 * Characters a terminal acts on instead of showing (C0/C1 controls but the newline, bidirectional
 * overrides): text from a snapshot file or bundle may be a stranger's, so they are printed escaped.
 */
// biome-ignore lint/suspicious/noControlCharactersInRegex: matching control characters is its job
const UNPRINTABLE = /[\u0000-\u0009\u000b-\u001f\u007f-\u009f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]/g;

/** `text` with every character a terminal would act on shown as `\u{…}`. */
export function printable(text: string): string {
  return text.replace(UNPRINTABLE, (c) => `\\u{${c.codePointAt(0)!.toString(16)}}`);
}

export function makeOutput(json: boolean): Output {
  return {
    json,
    text: (line) => {
      if (!json) process.stdout.write(`${printable(line)}\n`);
    },
    result: (value) => {
      if (json) process.stdout.write(`${JSON.stringify(value, null, 2)}\n`);
    },
  };
}

/** Report an error: one line on stderr (what failed — what to do), or a JSON object with --json. */
export function reportError(err: unknown, json: boolean): number {
  const error = asQsnapError(err);
  if (json) process.stdout.write(`${JSON.stringify({ ok: false, error: error.toJSON() }, null, 2)}\n`);
  else {
    // One line: what failed — what to do [CODE] (what qsnap put back afterwards).
    const cleanup = error.details['cleanup'];
    const phase = error.details['phase'];
    const after =
      Array.isArray(cleanup) && cleanup.length
        ? ` (${typeof phase === 'string' ? `during ${phase}; ` : ''}afterwards: ${cleanup.join('; ')})`
        : '';
    // One line whatever the message holds (it may quote a stranger's file).
    const line = printable(`qsnap: ${error.toLine()} [${error.code}]${after}`).replaceAll('\n', '\\n');
    process.stderr.write(`${line}\n`);
    if (process.env['QSNAP_DEBUG'] && err instanceof Error) process.stderr.write(`${err.stack}\n`);
  }
  return error.code === 'QSNAP_USAGE' ? 2 : 1;
}

const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];

export function formatBytes(bytes: number): string {
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < UNITS.length - 1) {
    value /= 1024;
    unit++;
  }
  return `${unit === 0 ? value : value.toFixed(value >= 100 ? 0 : 1)} ${UNITS[unit]}`;
}

export function formatMs(ms: number): string {
  return ms < 10
    ? `${ms.toFixed(2)} ms`
    : ms < 10_000
      ? `${ms.toFixed(0)} ms`
      : `${(ms / 1000).toFixed(1)} s`;
}

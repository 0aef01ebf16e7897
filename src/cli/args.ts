import { type ParseArgsConfig, parseArgs } from 'node:util';

import { QsnapError } from '../errors.js';

export class UsageError extends QsnapError {
  constructor(message: string, hint = 'see --help') {
    super('QSNAP_USAGE', message, { hint });
  }
}

export interface CommandSpec<O extends ParseArgsConfig['options']> {
  name: string;
  summary: string;
  usage: string;
  /** Help text for each option, keyed like `options`. */
  help: Record<string, string>;
  options: O;
  examples?: readonly string[];
  allowPositionals?: boolean;
}

export function helpText(spec: CommandSpec<Options>): string {
  const lines = [`Usage: ${spec.usage}`, '', spec.summary, '', 'Options:'];
  const entries = Object.entries(spec.options ?? {});
  const labels = entries.map(
    ([name, o]) => `  ${o.short ? `-${o.short}, ` : ''}--${name}${o.type === 'string' ? ' <value>' : ''}`,
  );
  const width = Math.max(...labels.map((l) => l.length), 12) + 2;
  for (const [i, [name]] of entries.entries())
    lines.push(`${labels[i]!.padEnd(width)}${spec.help[name] ?? ''}`);
  lines.push(`${'  -h, --help'.padEnd(width)}show this help`);
  if (spec.examples?.length) lines.push('', 'Examples:', ...spec.examples.map((e) => `  ${e}`));
  return `${lines.join('\n')}\n`;
}

type HelpOption = { help: { type: 'boolean'; short: 'h' } };
type Parsed<O extends Options> = ReturnType<
  typeof parseArgs<{ args: string[]; options: O & HelpOption; allowPositionals: boolean; strict: true }>
>;
type Options = NonNullable<ParseArgsConfig['options']>;

export function parse<const O extends Options>(spec: CommandSpec<O>, argv: string[]): Parsed<O> {
  try {
    const help: HelpOption = { help: { type: 'boolean', short: 'h' } };
    return parseArgs({
      args: argv,
      options: { ...spec.options, ...help },
      allowPositionals: spec.allowPositionals ?? false,
      strict: true,
    });
  } catch (err) {
    throw new UsageError(`${spec.name}: ${(err as Error).message}`, `see qsnap ${spec.name} --help`);
  }
}

/** `512M`, `2G`, `1.5GiB`, `100000` → bytes. */
export function parseSize(text: string, what: string): number {
  const match = /^(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)?$/i.exec(text.trim());
  if (!match)
    throw new UsageError(
      `${what}: cannot read "${text}" as a size`,
      'use a number with an optional K, M, G or T suffix, e.g. 512M',
    );
  const scale = { '': 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40 }[
    match[2]!.toLowerCase() as '' | 'k' | 'm' | 'g' | 't'
  ];
  return Math.round(Number(match[1]) * scale);
}

/** Parse a command's arguments; on --help print its help and return undefined. */
export function parseCommand<const O extends Options>(
  spec: CommandSpec<O>,
  argv: string[],
): Parsed<O> | undefined {
  const parsed = parse(spec, argv);
  if ((parsed.values as { help?: boolean }).help) {
    process.stdout.write(helpText(spec));
    return undefined;
  }
  return parsed;
}

/** The one snapshot file a command takes as its positional argument. */
export function singleFile(name: string, positionals: string[]): string {
  const [file, ...extra] = positionals;
  if (!file || extra.length)
    throw new UsageError(`${name}: give exactly one snapshot file`, `see qsnap ${name} --help`);
  return file;
}

/**
 * A command line given as one string (`--cmdline '…'`), split as a POSIX shell splits words:
 * blanks separate, '…' is literal, "…" and \ escape. No expansion of any kind.
 */
export function splitCommandLine(text: string): string[] {
  const words: string[] = [];
  let word: string | undefined;
  let quote: '"' | "'" | undefined;
  for (let i = 0; i < text.length; i++) {
    const ch = text[i]!;
    if (quote === "'" ? ch === "'" : quote === '"' && ch === '"') quote = undefined;
    else if (!quote && (ch === "'" || ch === '"')) {
      quote = ch;
      word ??= '';
    } else if (ch === '\\' && quote !== "'" && i + 1 < text.length) word = (word ?? '') + text[++i];
    else if (!quote && /\s/.test(ch)) {
      if (word !== undefined) words.push(word);
      word = undefined;
    } else word = (word ?? '') + ch;
  }
  if (quote) throw new UsageError(`--cmdline: unterminated ${quote} quote`, 'close the quote');
  if (word !== undefined) words.push(word);
  return words;
}

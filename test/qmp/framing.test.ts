import { describe, expect, it } from 'vitest';
import { QmpProtocolError } from '../../src/qmp/errors.js';
import { encodeMessage, JsonLineDecoder } from '../../src/qmp/framing.js';

/** Feeds `bytes` in the given pieces and collects every message. */
function decodeAll(pieces: Buffer[], options?: { maxLineBytes?: number }): unknown[] {
  const decoder = new JsonLineDecoder(options);
  const out: unknown[] = [];
  for (const piece of pieces) {
    decoder.push(piece);
    for (let v = decoder.tryNext(); v !== undefined; v = decoder.tryNext()) out.push(v);
  }
  decoder.end();
  return out;
}

function splitAt(bytes: Buffer, ...cuts: number[]): Buffer[] {
  const points = [0, ...cuts, bytes.length];
  return points.slice(1).map((end, i) => bytes.subarray(points[i], end));
}

// Captured from QEMU 7.2: a STOP event and the reply to `stop`, as one read.
const STREAM = Buffer.from(
  '{"timestamp": {"seconds": 1795295163, "microseconds": 140891}, "event": "STOP"}\r\n' +
    '{"return": {}, "id": 7}\r\n',
);
const EXPECTED = [
  { timestamp: { seconds: 1795295163, microseconds: 140891 }, event: 'STOP' },
  { return: {}, id: 7 },
];

describe('JsonLineDecoder', () => {
  it('decodes several messages from one chunk', () => {
    expect(decodeAll([STREAM])).toEqual(EXPECTED);
  });

  it('decodes the same stream split at every byte boundary', () => {
    for (let cut = 1; cut < STREAM.length; cut++) {
      expect(decodeAll(splitAt(STREAM, cut)), `cut at ${cut}`).toEqual(EXPECTED);
    }
  });

  it('decodes the stream fed one byte at a time and in odd-sized chunks', () => {
    const bytes = [...STREAM].map((b) => Buffer.from([b]));
    expect(decodeAll(bytes)).toEqual(EXPECTED);
    for (const size of [2, 3, 7, 13, 64]) {
      const pieces: Buffer[] = [];
      for (let i = 0; i < STREAM.length; i += size) pieces.push(STREAM.subarray(i, i + size));
      expect(decodeAll(pieces), `size ${size}`).toEqual(EXPECTED);
    }
  });

  it('keeps multi-byte UTF-8 intact when a character is split between chunks', () => {
    // "é" is C3 A9, "€" is E2 82 AC, "𝄞" is F0 9D 84 9E.
    const line = Buffer.from('{"return": "café € 𝄞", "id": 1}\n');
    for (let cut = 1; cut < line.length; cut++) {
      expect(decodeAll(splitAt(line, cut))).toEqual([{ return: 'café € 𝄞', id: 1 }]);
    }
    // Negative control: decoding the pieces separately (what a naive chunk decoder does) tears it.
    const e = line.indexOf(0xc3);
    expect(line.subarray(0, e + 1).toString('utf8') + line.subarray(e + 1).toString('utf8')).not.toContain(
      'é',
    );
  });

  it('accepts LF and CRLF endings and skips blank lines', () => {
    expect(decodeAll([Buffer.from('\r\n{"a":1}\n\n{"b":2}\r\n   \r\n')])).toEqual([{ a: 1 }, { b: 2 }]);
  });

  it('returns undefined while a line is incomplete', () => {
    const decoder = new JsonLineDecoder();
    decoder.push(Buffer.from('{"return": {}'));
    expect(decoder.tryNext()).toBeUndefined();
    decoder.push(Buffer.from(', "id": 1}\r\n'));
    expect(decoder.tryNext()).toEqual({ return: {}, id: 1 });
    expect(decoder.tryNext()).toBeUndefined();
  });

  it('counts bytes consumed so each message knows its offset', () => {
    const decoder = new JsonLineDecoder();
    decoder.push(STREAM);
    expect(decoder.bytesConsumed).toBe(0);
    decoder.tryNext();
    expect(decoder.bytesConsumed).toBe(STREAM.indexOf('\n') + 1);
    decoder.tryNext();
    expect(decoder.bytesConsumed).toBe(STREAM.length);
  });

  it('raises a coded error for a line that is not JSON, with its offset', () => {
    const decoder = new JsonLineDecoder();
    decoder.push(Buffer.from('{"a":1}\n{not json}\n'));
    expect(decoder.tryNext()).toEqual({ a: 1 });
    const err = catchErr(() => decoder.tryNext());
    expect(err).toBeInstanceOf(QmpProtocolError);
    expect(err).toMatchObject({
      code: 'QSNAP_QMP_PROTOCOL',
      reason: 'malformed-json',
      details: { offset: 8 },
    });
  });

  it('enforces the line limit on a partial line and on a complete one', () => {
    const partial = new JsonLineDecoder({ maxLineBytes: 16 });
    partial.push(Buffer.from('{"aaaaaaa'));
    expect(catchErr(() => partial.push(Buffer.from('aaaaaaaaaaaaa')))).toMatchObject({
      code: 'QSNAP_QMP_PROTOCOL',
      reason: 'line-too-long',
    });

    const complete = new JsonLineDecoder({ maxLineBytes: 16 });
    expect(catchErr(() => complete.push(Buffer.from('{"a":"0123456789abcdef"}\n')))).toMatchObject({
      reason: 'line-too-long',
    });

    // Negative control: many short lines in one chunk, longer in total than the limit, pass.
    const many = new JsonLineDecoder({ maxLineBytes: 16 });
    many.push(Buffer.from('{"a":1}\n'.repeat(10)));
    expect(many.bufferedBytes).toBe(80);
    // A line of exactly the limit (the LF not counted) passes too.
    expect(decodeAll([Buffer.from('{"a":"012345678"}\n')], { maxLineBytes: 17 })).toEqual([
      { a: '012345678' },
    ]);
  });

  it('reports a stream that ends inside a message', () => {
    const decoder = new JsonLineDecoder();
    decoder.push(Buffer.from('{"a":1}\n{"return"'));
    expect(decoder.tryNext()).toEqual({ a: 1 });
    expect(catchErr(() => decoder.end())).toMatchObject({ code: 'QSNAP_QMP_PROTOCOL', reason: 'truncated' });
    // Negative control: trailing whitespace is no truncation.
    const clean = new JsonLineDecoder();
    clean.push(Buffer.from('{"a":1}\r\n\r'));
    clean.tryNext();
    expect(() => clean.end()).not.toThrow();
  });

  it('round-trips encodeMessage through the decoder', () => {
    const message = {
      execute: 'human-monitor-command',
      arguments: { 'command-line': 'info status ✓' },
      id: 3,
    };
    const bytes = encodeMessage(message);
    expect(bytes.subarray(-2).toString()).toBe('\r\n');
    expect(decodeAll([bytes])).toEqual([message]);
  });
});

function catchErr(fn: () => unknown): unknown {
  try {
    fn();
  } catch (err) {
    return err;
  }
  throw new Error('expected a throw');
}

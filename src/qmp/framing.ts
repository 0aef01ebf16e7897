/**
 * QMP framing: one JSON value per line. QEMU ends each message with "\r\n" and never breaks a
 * message across lines (monitor/qmp.c, qmp_send_response: the JSON is printed with pretty=false).
 *
 * A pure codec, no I/O: `push` bytes as they arrive, `tryNext` while it returns something.
 * Lines are decoded as UTF-8 only once complete, so a multi-byte character split between two
 * chunks is never torn.
 */
import { QmpProtocolError } from './errors.js';

/** Default limit for one buffered line. QEMU's largest replies (query-qmp-schema) are ~200 KiB. */
export const DEFAULT_MAX_LINE_BYTES = 16 * 1024 * 1024;

const LF = 0x0a;

export class JsonLineDecoder {
  readonly maxLineBytes: number;
  /** Complete lines not yet handed out, each with its absolute offset in the stream. */
  #lines: { bytes: Buffer; offset: number }[] = [];
  /** Bytes of the line still being received, oldest first. */
  #partial: Buffer[] = [];
  #partialBytes = 0;
  /** Absolute offset of the first byte of the partial line. */
  #partialOffset = 0;
  #bytesConsumed = 0;

  constructor(options: { maxLineBytes?: number } = {}) {
    this.maxLineBytes = options.maxLineBytes ?? DEFAULT_MAX_LINE_BYTES;
  }

  /** Bytes fed in and handed out as messages so far: the stream offset of the next message. */
  get bytesConsumed(): number {
    return this.#bytesConsumed;
  }

  /** Bytes held: complete lines not yet read plus the partial line. */
  get bufferedBytes(): number {
    return this.#lines.reduce((n, l) => n + l.bytes.length, 0) + this.#partialBytes;
  }

  /** Appends bytes. Throws QmpProtocolError `line-too-long` when a line outgrows the limit. */
  push(chunk: Uint8Array): void {
    const buf = Buffer.isBuffer(chunk)
      ? chunk
      : Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength);
    let start = 0;
    for (let lf = buf.indexOf(LF, start); lf !== -1; lf = buf.indexOf(LF, start)) {
      const piece = buf.subarray(start, lf + 1);
      this.#checkLimit(this.#partialBytes + piece.length - 1);
      const bytes = this.#partial.length === 0 ? piece : Buffer.concat([...this.#partial, piece]);
      this.#lines.push({ bytes, offset: this.#partialOffset });
      this.#partialOffset += bytes.length;
      this.#partial = [];
      this.#partialBytes = 0;
      start = lf + 1;
    }
    if (start < buf.length) {
      const rest = buf.subarray(start);
      this.#checkLimit(this.#partialBytes + rest.length);
      this.#partial.push(rest);
      this.#partialBytes += rest.length;
    }
  }

  /**
   * The next complete message as parsed JSON, or undefined while no complete line is buffered.
   * Blank lines are skipped. Throws QmpProtocolError `malformed-json` for a line that is not JSON.
   */
  tryNext(): unknown {
    for (;;) {
      const line = this.#lines.shift();
      if (line === undefined) return undefined;
      this.#bytesConsumed = line.offset + line.bytes.length;
      const text = line.bytes.toString('utf8').trim();
      if (text === '') continue;
      try {
        return JSON.parse(text);
      } catch (err) {
        throw new QmpProtocolError(
          'malformed-json',
          `QMP peer sent a line that is not JSON: ${excerpt(text)}`,
          {
            cause: err,
            details: { offset: line.offset, line: excerpt(text) },
          },
        );
      }
    }
  }

  /** Call at end of stream: throws QmpProtocolError `truncated` if a message was cut short. */
  end(): void {
    const rest = Buffer.concat(this.#partial).toString('utf8').trim();
    this.#partial = [];
    this.#partialBytes = 0;
    if (rest !== '') {
      throw new QmpProtocolError('truncated', 'QMP stream ended inside a message', {
        details: { offset: this.#partialOffset, line: excerpt(rest) },
      });
    }
  }

  #checkLimit(lineBytes: number): void {
    if (lineBytes > this.maxLineBytes) {
      throw new QmpProtocolError(
        'line-too-long',
        `QMP message longer than ${this.maxLineBytes} bytes (at offset ${this.#partialOffset})`,
        { details: { offset: this.#partialOffset, maxLineBytes: this.maxLineBytes } },
      );
    }
  }
}

/** One message on the wire. QEMU's parser takes any JSON whitespace between values. */
export function encodeMessage(message: Record<string, unknown>): Buffer {
  return Buffer.from(`${JSON.stringify(message)}\r\n`, 'utf8');
}

function excerpt(text: string, max = 80): string {
  return text.length > max ? `${text.slice(0, max)}…` : text;
}

import { QsnapError } from '../errors.js';

/**
 * Errors of the QEMU migration stream codec, parser and writer.
 *
 *   QsnapError
 *   └── StreamError
 *         QSNAP_STREAM_FORMAT       the bytes are not a valid QEMU migration stream (bad magic,
 *                                   version, section type, flags, footer, offset…);
 *                                   `details.offset` is the absolute stream offset
 *         QSNAP_STREAM_TRUNCATED    the input ended inside a record, or before the device
 *                                   state tail (EOF + VMDESCRIPTION) was complete
 *         QSNAP_STREAM_UNSUPPORTED  a valid stream using a feature qsnap does not parse
 *                                   (XBZRLE/compression/multifd/RDMA pages, postcopy, mapped-ram,
 *                                   iterable devices other than RAM, early-setup devices,
 *                                   page sizes other than 4096…); the hint says what to change
 *         QSNAP_STREAM_LIMIT        a buffered item is over a hard limit (configuration, block
 *                                   list, device tail)
 */
export type StreamErrorCode =
  | 'QSNAP_STREAM_FORMAT'
  | 'QSNAP_STREAM_TRUNCATED'
  | 'QSNAP_STREAM_UNSUPPORTED'
  | 'QSNAP_STREAM_LIMIT';

export interface StreamErrorOptions {
  hint?: string;
  cause?: unknown;
  /** Absolute byte offset in the stream where the offending item starts, when known. */
  offset?: number;
  details?: Record<string, unknown>;
}

export class StreamError extends QsnapError {
  declare readonly code: StreamErrorCode;

  constructor(code: StreamErrorCode, message: string, options: StreamErrorOptions = {}) {
    const { offset, details, ...rest } = options;
    super(code, message, {
      ...rest,
      details: offset === undefined ? { ...details } : { offset, ...details },
    });
  }

  /** Absolute stream offset of the offending item, when the error has one. */
  get offset(): number | undefined {
    const offset = this.details['offset'];
    return typeof offset === 'number' ? offset : undefined;
  }
}

const CORRUPT_HINT = 'the stream is corrupt or not a QEMU migration stream; take the snapshot again';

export function formatError(message: string, offset: number, details?: Record<string, unknown>): StreamError {
  return new StreamError('QSNAP_STREAM_FORMAT', message, {
    hint: CORRUPT_HINT,
    offset,
    ...(details ? { details } : {}),
  });
}

export function truncatedError(
  message: string,
  offset: number,
  details?: Record<string, unknown>,
): StreamError {
  return new StreamError('QSNAP_STREAM_TRUNCATED', message, {
    hint: 'the migration stream ended early (QEMU failed or the connection dropped); take the snapshot again',
    offset,
    ...(details ? { details } : {}),
  });
}

export function unsupportedError(
  message: string,
  hint: string,
  offset: number | undefined,
  details?: Record<string, unknown>,
): StreamError {
  return new StreamError('QSNAP_STREAM_UNSUPPORTED', message, {
    hint,
    ...(offset === undefined ? {} : { offset }),
    ...(details ? { details } : {}),
  });
}

export function limitError(message: string, offset: number, limit: number, option?: string): StreamError {
  return new StreamError('QSNAP_STREAM_LIMIT', message, {
    hint: option
      ? `raise the parser option ${option} if this stream is genuine`
      : 'this stream is not one qsnap can hold in memory',
    offset,
    details: { limit },
  });
}

/**
 * The four kinds of message a QMP server sends (docs/interop/qmp-spec.rst):
 *
 *   greeting  {"QMP": {"version": {...}, "capabilities": [...]}}
 *   success   {"return": <json>, "id": <json>}
 *   error     {"error": {"class": str, "desc": str}, "id": <json>}
 *   event     {"event": str, "data": {...}, "timestamp": {"seconds": int, "microseconds": int}}
 *
 * `parseMessage` tells them apart by their key and checks the envelope; a command's `return`
 * value is checked later against that command's schema (commands.ts). Objects are loose: QEMU
 * may add keys in newer versions.
 */
import { z } from 'zod';
import { QmpProtocolError, summarizeIssues } from './errors.js';

export const versionTripleSchema = z.looseObject({
  major: z.number(),
  minor: z.number(),
  micro: z.number(),
});

/** qapi/control.json VersionInfo; query-version returns the same. */
export const versionInfoSchema = z.looseObject({
  qemu: versionTripleSchema,
  package: z.string(),
});

export const greetingSchema = z.looseObject({
  QMP: z.looseObject({
    version: versionInfoSchema,
    capabilities: z.array(z.string()),
  }),
});

export const successReplySchema = z.looseObject({
  return: z.unknown(),
  id: z.unknown().optional(),
});

export const errorReplySchema = z.looseObject({
  error: z.looseObject({ class: z.string(), desc: z.string() }),
  id: z.unknown().optional(),
});

export const eventMessageSchema = z.looseObject({
  event: z.string(),
  data: z.record(z.string(), z.unknown()).optional(),
  timestamp: z.looseObject({ seconds: z.number(), microseconds: z.number() }),
});

export type QmpGreetingMessage = z.infer<typeof greetingSchema>;
export type QmpEventMessage = z.infer<typeof eventMessageSchema>;

export type QmpMessage =
  | { kind: 'greeting'; greeting: QmpGreetingMessage }
  | { kind: 'return'; id: unknown; value: unknown }
  | { kind: 'error'; id: unknown; errorClass: string; desc: string }
  | { kind: 'event'; event: QmpEventMessage };

/**
 * Classifies a parsed JSON value. Throws QmpProtocolError `unexpected-message` for anything that
 * is not a well-formed QMP server message.
 */
export function parseMessage(value: unknown): QmpMessage {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    throw unexpected('a QMP message must be a JSON object', value);
  }
  if ('event' in value) {
    const event = check(eventMessageSchema, value, 'event');
    return { kind: 'event', event };
  }
  if ('return' in value) {
    const reply = check(successReplySchema, value, 'reply');
    return { kind: 'return', id: reply.id, value: reply.return };
  }
  if ('error' in value) {
    const reply = check(errorReplySchema, value, 'error reply');
    return { kind: 'error', id: reply.id, errorClass: reply.error.class, desc: reply.error.desc };
  }
  if ('QMP' in value) {
    return { kind: 'greeting', greeting: check(greetingSchema, value, 'greeting') };
  }
  throw unexpected('message is neither a reply, an event nor a greeting', value);
}

/** Microseconds since the epoch from QEMU's {seconds, microseconds} (qemu_get_timedate → g_get_real_time). */
export function timestampToUs(timestamp: { seconds: number; microseconds: number }): number {
  return timestamp.seconds * 1_000_000 + timestamp.microseconds;
}

function check<S extends z.ZodType>(schema: S, value: unknown, what: string): z.infer<S> {
  const parsed = schema.safeParse(value);
  if (!parsed.success) throw unexpected(`malformed ${what}: ${summarizeIssues(parsed.error.issues)}`, value);
  return parsed.data;
}

function unexpected(why: string, value: unknown): QmpProtocolError {
  const text = JSON.stringify(value) ?? String(value);
  return new QmpProtocolError('unexpected-message', `unexpected QMP message: ${why}`, {
    details: { message: text.length > 200 ? `${text.slice(0, 200)}…` : text },
  });
}

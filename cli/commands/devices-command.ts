/**
 * `fleetstream devices`: one NATS (or MQTT) user per device, so that a device's credential speaks
 * for its own device id only (README.md, "NATS roles").
 *
 * Why config-file users with bcrypt hashes, and not nkeys or JWTs: nats-server 2.9 is the floor,
 * MQTT clients log in with a user name and password (nkeys cannot sign an MQTT CONNECT), and the
 * accounts in infra/nats/accounts.conf are config-file accounts. So the users live in
 * infra/nats/devices.conf, included by accounts.conf, which this command rewrites whole (a new
 * file renamed over the old one, so a reload never reads half a file) and then asks nats-server to
 * reload (SIGHUP, what `nats-server --signal reload=<pid>` sends). On reload the server closes the
 * connections of a user that is gone, so `revoke` cuts a device off at once.
 */
import { OperatorError } from '../../schemas/errors.ts'
import { randomBytes } from 'node:crypto'
import { readFile, rename, writeFile } from 'node:fs/promises'
import { dirname, join } from 'node:path'
import bcrypt from 'bcryptjs'
import { Command, Option } from 'commander'
import * as z from 'zod'
import { DEVICE_ID_PATTERN } from '../../schemas/envelope.ts'
import { EVENTS_SUBJECT_PREFIX } from '../../schemas/subjects.ts'
import { JSON_HELP } from '../json-output.ts'

/** The kinds of event a device publishes about itself (never `alert` or `tick`). */
export const DEVICE_EVENT_KINDS = ['registered', 'reading', 'heartbeat', 'status'] as const

/** NATS clients of the DEVICES account; MQTT clients of MQTT_DEVICES. */
export type Transport = 'nats' | 'mqtt'

/**
 * Users of accounts.conf that a device may not be named after (a duplicate user name makes
 * nats-server refuse the whole configuration).
 */
const RESERVED_USERS = new Set(['admin', 'processor', 'gateway', 'system', 'route'])

/**
 * bcrypt's work factor. A device password is 192 random bits, so nobody guesses it whatever the
 * cost; the hash keeps a reader of devices.conf from logging in. A low cost keeps the server's
 * CPU free when a whole fleet reconnects at once (every CONNECT checks one hash).
 */
const BCRYPT_COST = 6

/**
 * Where the device users are and which server to reload.
 *
 * @example
 * NATS_DEVICES_FILE=infra/nats/devices.conf NATS_PID_FILE=.data/nats/nats.pid
 */
const DevicesEnv = z.object({
  NATS_DEVICES_FILE: z.string().min(1).default('infra/nats/devices.conf'),
  NATS_PID_FILE: z.string().min(1).optional(),
})
type DevicesEnv = z.infer<typeof DevicesEnv>

/** A user entry of devices.conf, as nats-server reads it (the file holds JSON values). */
export interface DeviceUser {
  readonly user: string
  readonly password: string
  readonly permissions: {
    readonly publish: { readonly allow: readonly string[] }
    readonly subscribe: { readonly allow?: readonly string[]; readonly deny?: readonly string[] }
  }
  readonly allowed_connection_types: readonly string[]
}

export interface DevicesFile {
  /** DEVICE_USERS: devices over NATS (account DEVICES). */
  readonly nats: readonly DeviceUser[]
  /** MQTT_DEVICE_USERS: devices over MQTT (account MQTT_DEVICES). */
  readonly mqtt: readonly DeviceUser[]
}

/** What `devices add` hands out, once. */
export interface DeviceCredential {
  readonly deviceId: string
  readonly transport: Transport
  /** NATS_USER, or the MQTT user name; the device id. */
  readonly user: string
  readonly password: string
  /** NATS_INBOX_PREFIX of a NATS device: the only inbox it may subscribe to. */
  readonly inboxPrefix?: string
  /** The MQTT client id to use (another connection with the same client id replaces it). */
  readonly mqttClientId?: string
}

/** Bad usage of `fleetstream devices`: exits 2 with the message. */
export class DevicesCommandError extends OperatorError {}

/** The inbox prefix a NATS device uses, and the only one it may subscribe to. */
export function deviceInboxPrefix(deviceId: string): string {
  return `_INBOX.${deviceId}`
}

/** The user entry of one device: publish its own four event subjects, read its own inbox. */
export function deviceUser(deviceId: string, transport: Transport, hash: string): DeviceUser {
  const publish = {
    allow: DEVICE_EVENT_KINDS.map((k) => `${EVENTS_SUBJECT_PREFIX}.${deviceId}.${k}`),
  }
  return transport === 'nats'
    ? {
        user: deviceId,
        password: hash,
        permissions: { publish, subscribe: { allow: [`${deviceInboxPrefix(deviceId)}.>`] } },
        allowed_connection_types: ['STANDARD'],
      }
    : {
        user: deviceId,
        password: hash,
        permissions: { publish, subscribe: { deny: ['>'] } },
        allowed_connection_types: ['MQTT'],
      }
}

const HEADER = `# fleetstream: one NATS or MQTT user per device, written by \`fleetstream devices add|revoke\`
# (NATS_DEVICES_FILE points the command at this file). Included by infra/nats/accounts.conf.
#
# Each entry holds a bcrypt hash of the device's password, never the password itself, and the
# device's permissions: publish the four event subjects of its own id, subscribe to its own
# inbox (NATS) or nothing (MQTT). Edit it with the command, which rewrites it whole and asks
# nats-server to reload; a hand edit is overwritten by the next one.
`

/** devices.conf's text: each variable a JSON array, one user a line (JSON is NATS config too). */
export function formatDevicesFile(f: DevicesFile): string {
  const list = (users: readonly DeviceUser[]) =>
    users.map((u) => `  ${JSON.stringify(u)}`).join(',\n') + (users.length > 0 ? '\n' : '')
  return `${HEADER}DEVICE_USERS = [\n${list(f.nats)}]\nMQTT_DEVICE_USERS = [\n${list(f.mqtt)}]\n`
}

export function parseDevicesFile(text: string, path: string): DevicesFile {
  const read = (name: string): DeviceUser[] => {
    const m = new RegExp(`^${name} = (\\[[\\s\\S]*?^\\])`, 'm').exec(text)
    if (!m?.[1]) throw new DevicesCommandError(`${path}: no '${name} = [ ... ]' in the file`)
    try {
      return JSON.parse(m[1]) as DeviceUser[]
    } catch (err) {
      throw new DevicesCommandError(
        `${path}: '${name}' is not what 'fleetstream devices' writes (${String(err)})`,
      )
    }
  }
  return { nats: read('DEVICE_USERS'), mqtt: read('MQTT_DEVICE_USERS') }
}

async function load(env: DevicesEnv): Promise<DevicesFile> {
  return parseDevicesFile(await readFile(env.NATS_DEVICES_FILE, 'utf8'), env.NATS_DEVICES_FILE)
}

/** Writes a new file beside the old one and renames it over: a reload sees one or the other. */
async function save(env: DevicesEnv, f: DevicesFile): Promise<void> {
  const path = env.NATS_DEVICES_FILE
  const tmp = join(dirname(path), `.devices.conf.${process.pid}.${randomBytes(4).toString('hex')}`)
  await writeFile(tmp, formatDevicesFile(f), { mode: 0o600, flush: true })
  await rename(tmp, path)
}

/** Asks the nats-server of NATS_PID_FILE to reload; says what to do when there is none. */
async function reload(env: DevicesEnv): Promise<string> {
  if (env.NATS_PID_FILE === undefined)
    return `reload nats-server to apply it (nats-server --signal reload=<pid>, or SIGHUP; on every node of a cluster)`
  const text = (await readFile(env.NATS_PID_FILE, 'utf8')).trim()
  const pid = Number(text)
  if (!Number.isInteger(pid) || pid <= 0)
    throw new Error(`'NATS_PID_FILE' ${env.NATS_PID_FILE} must hold a process id, got '${text}'`)
  process.kill(pid, 'SIGHUP')
  return `nats-server (pid ${pid}) reloaded`
}

function checkId(deviceId: string): void {
  if (!DEVICE_ID_PATTERN.test(deviceId))
    throw new DevicesCommandError(
      `'deviceId' must match ${String(DEVICE_ID_PATTERN)}, got '${deviceId}'`,
    )
  if (RESERVED_USERS.has(deviceId))
    throw new DevicesCommandError(
      `'deviceId' must not be one of the shared users (${[...RESERVED_USERS].join(', ')}), got '${deviceId}'`,
    )
}

/** Adds a device and returns its credential (the password exists only in this result). */
export async function addDevice(
  env: DevicesEnv,
  deviceId: string,
  transport: Transport,
): Promise<{ credential: DeviceCredential; reloaded: string }> {
  checkId(deviceId)
  const f = await load(env)
  if ([...f.nats, ...f.mqtt].some((u) => u.user === deviceId))
    throw new DevicesCommandError(
      `device '${deviceId}' already has a credential: 'fleetstream devices revoke ${deviceId}' first`,
    )
  const password = randomBytes(24).toString('hex')
  const user = deviceUser(deviceId, transport, await bcrypt.hash(password, BCRYPT_COST))
  await save(
    env,
    transport === 'nats' ? { ...f, nats: [...f.nats, user] } : { ...f, mqtt: [...f.mqtt, user] },
  )
  const credential: DeviceCredential =
    transport === 'nats'
      ? { deviceId, transport, user: deviceId, password, inboxPrefix: deviceInboxPrefix(deviceId) }
      : { deviceId, transport, user: deviceId, password, mqttClientId: deviceId }
  return { credential, reloaded: await reload(env) }
}

/** Removes a device's user; on reload nats-server closes its connections. */
export async function revokeDevice(env: DevicesEnv, deviceId: string): Promise<string> {
  const f = await load(env)
  const keep = (users: readonly DeviceUser[]) => users.filter((u) => u.user !== deviceId)
  const next = { nats: keep(f.nats), mqtt: keep(f.mqtt) }
  if (next.nats.length + next.mqtt.length === f.nats.length + f.mqtt.length)
    throw new DevicesCommandError(`no device '${deviceId}' in ${env.NATS_DEVICES_FILE}`)
  await save(env, next)
  return reload(env)
}

export async function listDevices(
  env: DevicesEnv,
): Promise<{ deviceId: string; transport: Transport }[]> {
  const f = await load(env)
  return [
    ...f.nats.map((u) => ({ deviceId: u.user, transport: 'nats' as const })),
    ...f.mqtt.map((u) => ({ deviceId: u.user, transport: 'mqtt' as const })),
  ].sort((a, b) => a.deviceId.localeCompare(b.deviceId))
}

function devicesEnv(): DevicesEnv {
  return DevicesEnv.parse(process.env)
}

/** The `devices` command group (wired into cli/main.ts). */
export function devicesCommand(): Command {
  const devices = new Command('devices').description(
    'per-device credentials: each device may publish the events of its own id only',
  )
  devices
    .command('add')
    .description('add a device and print its credential (shown once: the server keeps a hash)')
    .argument('<deviceId>', 'the device id it may publish for')
    .addOption(new Option('--mqtt', 'an MQTT device (default: a NATS device)'))
    .option('--json', JSON_HELP.document('the credential'))
    .action(async (deviceId: string, opts: { mqtt?: boolean; json?: boolean }) => {
      const { credential: c, reloaded } = await addDevice(
        devicesEnv(),
        deviceId,
        opts.mqtt ? 'mqtt' : 'nats',
      )
      if (opts.json) {
        console.log(JSON.stringify(c))
        return
      }
      console.log(`device ${c.deviceId} added (${c.transport.toUpperCase()}); ${reloaded}.`)
      console.log('Its credential, shown this once:')
      if (c.transport === 'nats')
        console.log(
          `  NATS_USER=${c.user}\n  NATS_PASSWORD=${c.password}\n  NATS_INBOX_PREFIX=${c.inboxPrefix ?? ''}`,
        )
      else
        console.log(
          `  MQTT user name: ${c.user}\n  MQTT password:  ${c.password}\n  MQTT client id: ${c.mqttClientId ?? ''}`,
        )
    })
  devices
    .command('revoke')
    .description("remove a device's credential; the server closes its connections on reload")
    .argument('<deviceId>')
    .option('--json', JSON_HELP.document('the result'))
    .action(async (deviceId: string, opts: { json?: boolean }) => {
      const reloaded = await revokeDevice(devicesEnv(), deviceId)
      if (opts.json) console.log(JSON.stringify({ deviceId, revoked: true, reloaded }))
      else console.log(`device ${deviceId} revoked; ${reloaded}.`)
    })
  devices
    .command('list')
    .description('the devices that have a credential')
    .option('--json', JSON_HELP.array('devices'))
    .action(async (opts: { json?: boolean }) => {
      const list = await listDevices(devicesEnv())
      if (opts.json) console.log(JSON.stringify(list))
      else for (const d of list) console.log(`${d.deviceId}\t${d.transport}`)
    })
  return devices
}

/**
 * Secrets out of everything fleetstream prints: command output, error messages, configuration
 * errors and log lines all pass through {@link redact}.
 *
 * ```ts
 * redact('nats://a:pw1@n1:4222,nats://b:pw2@n2:4222')   // 'nats://a:***@n1:4222,nats://b:***@n2:4222'
 * redact('postgres://app@db/x?sslpassword=k&sslmode=require') // 'postgres://app@db/x?sslpassword=***&sslmode=require'
 * redact('refused with pw1', ['pw1'])                       // 'refused with ***'
 * ```
 */

/** What a secret is replaced with. */
export const MASK = '***'

/** A parameter or variable name that holds a secret: password, sslpassword, pass, pwd, token, ... */
const SECRET_NAME = /pass|pwd|token|secret|credential|nkey|api[-_]?key|private[-_]?key/i

/** Environment variables whose values are secrets (NATS_PASSWORD, NATS_TOKEN, PGPASSWORD, ...). */
export function isSecretName(name: string): boolean {
  return SECRET_NAME.test(name)
}

const SCHEME = String.raw`[A-Za-z][A-Za-z0-9+.-]*:\/\/`
/**
 * One URL: a scheme, then everything up to white space, a quote, or the `,` that starts the next
 * URL of a list (NATS_URL is a comma-separated list; each one may carry its own credentials).
 */
const URL_IN_TEXT = new RegExp(`(${SCHEME})([^\\s'"\`<>]*?)(?=,${SCHEME}|[\\s'"\`<>]|$)`, 'g')
/** `name=value` where the name says it is a secret: in a query, a key=value list, or prose. */
const SECRET_PARAM = /(^|[?&;\s,{(])([A-Za-z0-9_.-]+)=([^&;#\s'"`,)}]*)/g

/**
 * `text` with every credential hidden:
 *
 * - the password of each `user:password@` in a URL, every URL of a list included; for NATS URLs
 *   a bare `token@` too (a Postgres `user@` is a user name and stays);
 * - the value of every `password=`, `sslpassword=`, `pass=`, `token=`, ... (query parameters and
 *   `key=value` text);
 * - each of `secrets` wherever it appears (by default the values of the secret environment
 *   variables and the passwords inside URL-valued ones, see {@link environmentSecrets}).
 */
export function redact(text: string, secrets: Iterable<string> = environmentSecrets()): string {
  let out = text.replace(URL_IN_TEXT, (_m, scheme: string, rest: string) => {
    const cut = rest.search(/[?#]/)
    const head = cut === -1 ? rest : rest.slice(0, cut)
    const tail = cut === -1 ? '' : rest.slice(cut)
    return scheme + maskUserinfo(scheme, head) + tail
  })
  out = out.replace(SECRET_PARAM, (m, lead: string, name: string) =>
    isSecretName(name) ? `${lead}${name}=${MASK}` : m,
  )
  for (const s of secrets) {
    // Short values would mask ordinary words; URLs and names above cover those.
    if (s.length < 4) continue
    out = out.split(s).join(MASK)
    const json = JSON.stringify(s).slice(1, -1)
    if (json !== s) out = out.split(json).join(MASK)
  }
  return out
}

/**
 * A configuration value for an error message: like {@link redact}, and for a URL that did not
 * even parse (white space in it, say) everything between `://` and its last `@` is hidden too.
 */
export function redactValue(name: string, value: string): string {
  if (isSecretName(name)) return MASK
  const lenient = urlParts(value)
    .map((part) => {
      const m = new RegExp(`^(${SCHEME})(.*)@`, 's').exec(part)
      if (m === null) return part
      const [all, scheme = '', userinfo = ''] = m
      return scheme + maskUserinfo(scheme, `${userinfo}@`) + part.slice(all.length)
    })
    .join(',')
  return redact(lenient)
}

/** A comma-separated list of URLs, split where the next URL's scheme starts. */
function urlParts(value: string): string[] {
  return value.split(new RegExp(`,(?=${SCHEME})`))
}

function maskUserinfo(scheme: string, authority: string): string {
  const at = authority.lastIndexOf('@')
  if (at === -1) return authority
  const userinfo = authority.slice(0, at)
  const colon = userinfo.indexOf(':')
  const user = colon === -1 ? userinfo : userinfo.slice(0, colon)
  // In postgres://name@host the name is a user; in nats://x@host it is a token.
  const userOnly = colon === -1 && /^postgres(ql)?:/i.test(scheme) && /^[^\s,]*$/.test(userinfo)
  if (userOnly) return authority
  const shown = colon === -1 || userinfo.includes(',') || /\s/.test(user) ? MASK : `${user}:${MASK}`
  return `${shown}${authority.slice(at)}`
}

let fromEnvironment: readonly string[] | undefined

/**
 * The secrets of this process's environment, read once: the values of variables named like
 * secrets (NATS_PASSWORD, NATS_TOKEN, PGPASSWORD, ...) and the passwords (as written and
 * percent-decoded) and secret query parameters inside URL-valued variables (DATABASE_URL,
 * NATS_URL), so that they stay hidden even where something prints them without their URL.
 */
export function environmentSecrets(
  env: Record<string, string | undefined> = process.env,
): readonly string[] {
  if (env === process.env && fromEnvironment !== undefined) return fromEnvironment
  const found = new Set<string>()
  for (const [name, value] of Object.entries(env)) {
    if (value === undefined || value === '') continue
    if (isSecretName(name)) found.add(value)
    if (value.includes('://')) for (const s of secretsInUrls(value)) found.add(s)
  }
  const list = [...found].sort((a, b) => b.length - a.length)
  if (env === process.env) fromEnvironment = list
  return list
}

/** Passwords, tokens and secret parameters in a URL or a list of them. */
export function secretsInUrls(value: string): string[] {
  const out: string[] = []
  const add = (s: string) => {
    if (s === '') return
    out.push(s)
    try {
      const decoded = decodeURIComponent(s)
      if (decoded !== s) out.push(decoded)
    } catch {
      // not percent-encoded: as written is all there is
    }
  }
  // The userinfo ends at the last '@' before the path, or (written unencoded) at the last '@'.
  const userinfos = [new RegExp(`^(${SCHEME})([^/?#]*)@`), new RegExp(`^(${SCHEME})(.*)@`, 's')]
  for (const part of urlParts(value)) {
    for (const re of userinfos) {
      const [, scheme = '', userinfo = ''] = re.exec(part) ?? []
      if (scheme === '') continue
      const colon = userinfo.indexOf(':')
      if (colon !== -1) add(userinfo.slice(colon + 1))
      else if (!/^postgres(ql)?:/i.test(scheme)) add(userinfo)
    }
  }
  for (const m of value.matchAll(/[?&;]([^=&#\s]+)=([^&#\s]*)/g)) {
    if (isSecretName(m[1] ?? '')) add(m[2] ?? '')
  }
  return out
}

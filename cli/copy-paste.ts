/** URLs in the command lines the CLI prints for people to copy, never with a secret in them. */
import { secretsInUrls } from '../infra/redact.ts'

/**
 * A URL for a command line people copy: quoted as it is when it holds no secret, else the
 * variable that holds it (README.md tells users to export `DATABASE_URL` and `NATS_URL` in the
 * shell they paste into). Never a redacted URL: `***` in a password does not run.
 *
 * ```ts
 * `psql ${shellUrl('DATABASE_URL', config.databaseUrl)} -c 'select 1'`
 * // psql 'postgres://postgres@127.0.0.1:5432/fleetstream' -c 'select 1'
 * // psql "$DATABASE_URL" -c 'select 1'   (when the URL holds a password)
 * ```
 */
export function shellUrl(variable: string, url: string): string {
  return secretsInUrls(url).length > 0 ? `"$${variable}"` : `'${url.replaceAll("'", "'\\''")}'`
}

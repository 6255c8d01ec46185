// An independent Web Push user agent for the tests, on Node's own crypto
// (no code shared with the server): it makes subscription keys, and it
// decrypts an RFC 8291 aes128gcm message and checks its RFC 8292 VAPID
// signature.
//
//   node webpush_ua.mjs keygen
//     -> {"p256dh": <b64url 65 bytes>, "auth": <b64url 16 bytes>, "private": <b64url 32 bytes>}
//   node webpush_ua.mjs decrypt <private> <p256dh> <auth> <body b64url> <authorization header> <endpoint>
//     -> {"plaintext": "...", "vapid": {"aud": ..., "sub": ..., "exp": ...}}  (exit 1 on any failure)
import crypto from "node:crypto";

const b64u = (buf) => Buffer.from(buf).toString("base64url");
const unb64u = (s) => Buffer.from(s, "base64url");
const hmac = (key, data) => crypto.createHmac("sha256", key).update(data).digest();

function fail(msg) {
  console.error(msg);
  process.exit(1);
}

const [cmd, ...args] = process.argv.slice(2);
if (cmd === "keygen") {
  const ecdh = crypto.createECDH("prime256v1");
  ecdh.generateKeys();
  console.log(JSON.stringify({
    p256dh: b64u(ecdh.getPublicKey()),
    auth: b64u(crypto.randomBytes(16)),
    private: b64u(ecdh.getPrivateKey()),
  }));
} else if (cmd === "decrypt") {
  const [priv, p256dh, auth, bodyB64, authorization, endpoint] = args;
  const body = unb64u(bodyB64);
  const uaPublic = unb64u(p256dh);

  // RFC 8188 header: salt(16) rs(4) idlen(1) keyid(idlen).
  const salt = body.subarray(0, 16);
  const idlen = body[20];
  const asPublic = body.subarray(21, 21 + idlen);
  const ciphertext = body.subarray(21 + idlen);

  // RFC 8291 section 3.4, written out with HMAC as the RFC states it.
  const ecdh = crypto.createECDH("prime256v1");
  ecdh.setPrivateKey(unb64u(priv));
  const shared = ecdh.computeSecret(asPublic);
  const prkKey = hmac(unb64u(auth), shared);
  const keyInfo = Buffer.concat([Buffer.from("WebPush: info\0"), uaPublic, asPublic, Buffer.from([1])]);
  const ikm = hmac(prkKey, keyInfo);
  const prk = hmac(salt, ikm);
  const cek = hmac(prk, Buffer.concat([Buffer.from("Content-Encoding: aes128gcm\0"), Buffer.from([1])])).subarray(0, 16);
  const nonce = hmac(prk, Buffer.concat([Buffer.from("Content-Encoding: nonce\0"), Buffer.from([1])])).subarray(0, 12);

  const tag = ciphertext.subarray(ciphertext.length - 16);
  const decipher = crypto.createDecipheriv("aes-128-gcm", cek, nonce);
  decipher.setAuthTag(tag);
  let plain;
  try {
    plain = Buffer.concat([decipher.update(ciphertext.subarray(0, ciphertext.length - 16)), decipher.final()]);
  } catch (e) {
    fail(`decryption failed: ${e.message}`);
  }
  // Strip padding: the last record ends with 0x02, then zeros.
  let end = plain.length - 1;
  while (end >= 0 && plain[end] === 0) end--;
  if (plain[end] !== 2) fail("missing last-record delimiter");
  const plaintext = plain.subarray(0, end).toString("utf8");

  // RFC 8292: "vapid t=<jwt>, k=<public key>".
  const m = /^vapid t=([^,]+), k=(.+)$/.exec(authorization);
  if (!m) fail(`not a vapid authorization header: ${authorization}`);
  const [header, claims, signature] = m[1].split(".");
  const k = unb64u(m[2]);
  if (k.length !== 65 || k[0] !== 4) fail("vapid key is not an uncompressed P-256 point");
  const key = crypto.createPublicKey({
    key: { kty: "EC", crv: "P-256", x: b64u(k.subarray(1, 33)), y: b64u(k.subarray(33, 65)) },
    format: "jwk",
  });
  const ok = crypto.verify("sha256", Buffer.from(`${header}.${claims}`), { key, dsaEncoding: "ieee-p1363" }, unb64u(signature));
  if (!ok) fail("vapid signature does not verify");
  const head = JSON.parse(unb64u(header).toString());
  if (head.alg !== "ES256") fail(`vapid alg is ${head.alg}`);
  const vapid = JSON.parse(unb64u(claims).toString());
  const url = new URL(endpoint);
  if (vapid.aud !== `${url.protocol}//${url.host}`) fail(`vapid aud ${vapid.aud} is not the push service origin`);
  const now = Math.floor(Date.now() / 1000);
  if (!(vapid.exp > now && vapid.exp <= now + 24 * 3600)) fail(`vapid exp ${vapid.exp} out of range`);
  if (!vapid.sub) fail("vapid sub missing");
  console.log(JSON.stringify({ plaintext, vapid, key: m[2] }));
} else {
  fail("usage: webpush_ua.mjs keygen | decrypt ...");
}

#!/usr/bin/env bash
# Creates a development PKI for Kiln with openssl: a CA, a server certificate
# for the coordinator and a client certificate for agents (mutual TLS).
#
# usage: deploy/tls/dev-certs.sh [-o DIR] [NAME...]
#   NAME   extra DNS names or IP addresses of the coordinator, added to the
#          server certificate beside localhost and 127.0.0.1
#   -o DIR where the files go (default ./kiln-certs); existing files are
#          kept, so running it again only adds what is missing (remove
#          server.pem and server-key.pem to re-issue it with new names)
#
# Files: ca.pem, ca-key.pem (keep it off the farm), server.pem,
# server-key.pem, agent.pem, agent-key.pem. Keys are EC P-256, readable by
# their owner only. For development and trials: a production farm should
# take its certificates from the organisation's CA.
set -euo pipefail

out=./kiln-certs
days=825
while getopts "o:h" opt; do
  case $opt in
    o) out=$OPTARG ;;
    h) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "usage: $0 [-o DIR] [NAME...]" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))

if ! command -v openssl >/dev/null; then
  echo "error: openssl is missing; apt-get install -y openssl" >&2
  exit 1
fi

mkdir -p "$out"
umask 077
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

# subjectAltName for the server: localhost, 127.0.0.1 and every NAME,
# IP addresses as IP entries, the rest as DNS entries.
sans="DNS:localhost,IP:127.0.0.1"
for name in "$@"; do
  if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then
    sans+=",IP:$name"
  else
    sans+=",DNS:$name"
  fi
done

key() {
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null
}

# leaf NAME CN EXTENSIONS: NAME.pem and NAME-key.pem signed by the CA.
leaf() {
  local name=$1 cn=$2 extensions=$3
  if [[ -e $out/$name.pem ]]; then
    echo "kept    $out/$name.pem"
    return
  fi
  key "$out/$name-key.pem"
  openssl req -new -key "$out/$name-key.pem" -subj "/CN=$cn" -out "$scratch/$name.csr"
  printf '%s\n' "$extensions" >"$scratch/$name.ext"
  openssl x509 -req -in "$scratch/$name.csr" -CA "$out/ca.pem" -CAkey "$out/ca-key.pem" \
    -CAcreateserial -CAserial "$scratch/ca.srl" -days "$days" -sha256 \
    -extfile "$scratch/$name.ext" -out "$out/$name.pem" 2>/dev/null
  echo "created $out/$name.pem"
}

if [[ -e $out/ca.pem ]]; then
  echo "kept    $out/ca.pem"
else
  key "$out/ca-key.pem"
  openssl req -x509 -new -key "$out/ca-key.pem" -sha256 -days "$days" \
    -subj "/CN=Kiln development CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$out/ca.pem"
  echo "created $out/ca.pem"
fi

leaf server kiln-coordinator "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=$sans"

leaf agent kiln-agent "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"

chmod 644 "$out/ca.pem" "$out/server.pem" "$out/agent.pem"
echo "server certificate names: $(openssl x509 -in "$out/server.pem" -noout -ext subjectAltName | tail -n 1 | sed 's/^ *//')"

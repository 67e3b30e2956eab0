package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nkeys"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/clusterpubsub/pubsub/natsutil/embedded"
)

// startAuthServer starts a NATS server that configure sets authentication
// on, and stops it (and checks for leaked goroutines) at the end of t.
func startAuthServer(t *testing.T, configure func(o *server.Options)) *server.Server {
	t.Helper()
	ignore := goleak.IgnoreCurrent()
	s, err := embedded.StartServerWith(configure)
	require.NoError(t, err)
	t.Cleanup(func() {
		s.Shutdown()
		s.WaitForShutdown()
		goleak.VerifyNone(t, ignore)
	})
	return s
}

// members runs pubsub members against url with the extra args and
// returns its exit status and its output, stdout and stderr together.
func members(t *testing.T, url string, args ...string) (int, string) {
	t.Helper()
	var out, errs bytes.Buffer
	code := run(context.Background(), append([]string{"members", "--url", url, "--timeout", "5s"}, args...), &out, &errs)
	return code, out.String() + errs.String()
}

// A command given the connection flags authenticates with them; one given
// a wrong secret fails, says why, and prints no secret.
func TestConnFlagsUserPassword(t *testing.T) {
	s := startAuthServer(t, func(o *server.Options) { o.Username, o.Password = "alice", "s3cret-pw" })
	url := s.ClientURL()

	t.Run("members", func(t *testing.T) {
		code, out := members(t, url, "--user", "alice", "--password", "s3cret-pw")
		require.Equal(t, 0, code, out)
		assert.Regexp(t, `(?m)^pubsub-cli-\w+\s+client \(this tool\)\s`, out)
		assert.NotContains(t, out, "s3cret-pw")
	})
	t.Run("wrong password", func(t *testing.T) {
		code, out := members(t, url, "--user", "alice", "--password", "wr0ng-pw")
		assert.Equal(t, 1, code, out)
		assert.Contains(t, out, `connect to `+url+` (as user "alice"): nats: Authorization Violation`)
		assert.NotContains(t, out, "wr0ng-pw")
	})
	t.Run("no credentials", func(t *testing.T) {
		code, out := members(t, url)
		assert.Equal(t, 1, code, out)
		assert.Contains(t, out, "Authorization Violation")
	})
	t.Run("bench", func(t *testing.T) {
		var out, errs bytes.Buffer
		code := run(context.Background(), []string{"bench", "fanout", "--count", "100", "--nodes", "2", "--url", url,
			"--user", "alice", "--password", "s3cret-pw", "--json"}, &out, &errs)
		require.Equal(t, 0, code, errs.String())
		assert.Contains(t, out.String(), `"deliveries_per_sec"`)
		assert.NotContains(t, out.String()+errs.String(), "s3cret-pw")
	})
	t.Run("bench wrong password", func(t *testing.T) {
		var out, errs bytes.Buffer
		code := run(context.Background(), []string{"bench", "fanout", "--count", "10", "--url", url,
			"--user", "alice", "--password", "wr0ng-pw"}, &out, &errs)
		assert.Equal(t, 1, code, errs.String())
		assert.Contains(t, errs.String(), `(as user "alice"): nats: Authorization Violation`)
		assert.NotContains(t, out.String()+errs.String(), "wr0ng-pw")
	})
}

func TestConnFlagsToken(t *testing.T) {
	s := startAuthServer(t, func(o *server.Options) { o.Authorization = "t0ken-abc" })
	code, out := members(t, s.ClientURL(), "--token", "t0ken-abc")
	require.Equal(t, 0, code, out)
	assert.Contains(t, out, "(this tool)")
	assert.NotContains(t, out, "t0ken-abc")

	code, out = members(t, s.ClientURL(), "--token", "t0ken-xyz")
	assert.Equal(t, 1, code, out)
	assert.Contains(t, out, "(with --token): nats: Authorization Violation")
	assert.NotContains(t, out, "t0ken-xyz")
}

// newUserSeedFile writes a new user nkey's seed to a file of dir and
// returns the file and the public key.
func newUserSeedFile(t *testing.T, dir, name string) (path, public string) {
	t.Helper()
	kp, err := nkeys.CreateUser()
	require.NoError(t, err)
	seed, err := kp.Seed()
	require.NoError(t, err)
	public, err = kp.PublicKey()
	require.NoError(t, err)
	path = filepath.Join(dir, name)
	require.NoError(t, os.WriteFile(path, seed, 0o600))
	return path, public
}

func TestConnFlagsNkey(t *testing.T) {
	dir := t.TempDir()
	seed, public := newUserSeedFile(t, dir, "user.nk")
	other, _ := newUserSeedFile(t, dir, "other.nk")
	s := startAuthServer(t, func(o *server.Options) { o.Nkeys = []*server.NkeyUser{{Nkey: public}} })

	code, out := members(t, s.ClientURL(), "--nkey", seed)
	require.Equal(t, 0, code, out)
	assert.Contains(t, out, "(this tool)")

	code, out = members(t, s.ClientURL(), "--nkey", other)
	assert.Equal(t, 1, code, out)
	assert.Contains(t, out, "(with --nkey "+other+"): nats: Authorization Violation")
}

// The creds file of a user of an operator-mode server (JWT
// authentication), as nsc writes it.
func TestConnFlagsCreds(t *testing.T) {
	operator, err := nkeys.CreateOperator()
	require.NoError(t, err)
	opub, err := operator.PublicKey()
	require.NoError(t, err)
	oclaims := jwt.NewOperatorClaims(opub)
	ojwt, err := oclaims.Encode(operator)
	require.NoError(t, err)
	oclaims, err = jwt.DecodeOperatorClaims(ojwt)
	require.NoError(t, err)

	account, err := nkeys.CreateAccount()
	require.NoError(t, err)
	apub, err := account.PublicKey()
	require.NoError(t, err)
	ajwt, err := jwt.NewAccountClaims(apub).Encode(operator)
	require.NoError(t, err)

	user, err := nkeys.CreateUser()
	require.NoError(t, err)
	upub, err := user.PublicKey()
	require.NoError(t, err)
	useed, err := user.Seed()
	require.NoError(t, err)
	ujwt, err := jwt.NewUserClaims(upub).Encode(account)
	require.NoError(t, err)
	creds, err := jwt.FormatUserConfig(ujwt, useed)
	require.NoError(t, err)
	path := filepath.Join(t.TempDir(), "user.creds")
	require.NoError(t, os.WriteFile(path, creds, 0o600))

	resolver := &server.MemAccResolver{}
	require.NoError(t, resolver.Store(apub, ajwt))
	s := startAuthServer(t, func(o *server.Options) {
		o.TrustedOperators = []*jwt.OperatorClaims{oclaims}
		o.AccountResolver = resolver
	})

	code, out := members(t, s.ClientURL(), "--creds", path)
	require.Equal(t, 0, code, out)
	assert.Contains(t, out, "(this tool)")

	code, out = members(t, s.ClientURL())
	assert.Equal(t, 1, code, out)
	assert.Contains(t, out, "Authorization Violation")
}

// tlsFiles are the PEM files of a throwaway CA, a server certificate for
// 127.0.0.1 and a client certificate, both signed by the CA.
type tlsFiles struct {
	ca, serverCert, serverKey, clientCert, clientKey string
}

func newTLSFiles(t *testing.T) tlsFiles {
	t.Helper()
	dir := t.TempDir()
	write := func(name, typ string, der []byte) string {
		path := filepath.Join(dir, name)
		require.NoError(t, os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600))
		return path
	}
	newKey := func() *ecdsa.PrivateKey {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		require.NoError(t, err)
		return k
	}
	now := time.Now()
	caKey := newKey()
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	require.NoError(t, err)
	ca, err := x509.ParseCertificate(caDER)
	require.NoError(t, err)
	leaf := func(serial int64, name string, usage x509.ExtKeyUsage) (certPath, keyPath string) {
		key := newKey()
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: name},
			NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour), KeyUsage: x509.KeyUsageDigitalSignature,
			ExtKeyUsage: []x509.ExtKeyUsage{usage}, IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		require.NoError(t, err)
		keyDER, err := x509.MarshalECPrivateKey(key)
		require.NoError(t, err)
		return write(name+".pem", "CERTIFICATE", der), write(name+"-key.pem", "EC PRIVATE KEY", keyDER)
	}
	f := tlsFiles{ca: write("ca.pem", "CERTIFICATE", caDER)}
	f.serverCert, f.serverKey = leaf(2, "server", x509.ExtKeyUsageServerAuth)
	f.clientCert, f.clientKey = leaf(3, "client", x509.ExtKeyUsageClientAuth)
	return f
}

// A server that requires a client certificate signed by its CA.
func TestConnFlagsTLSClientCertificate(t *testing.T) {
	f := newTLSFiles(t)
	tc, err := server.GenTLSConfig(&server.TLSConfigOpts{CertFile: f.serverCert, KeyFile: f.serverKey, CaFile: f.ca, Verify: true})
	require.NoError(t, err)
	require.Equal(t, tls.RequireAndVerifyClientCert, tc.ClientAuth)
	s := startAuthServer(t, func(o *server.Options) {
		o.TLSConfig, o.TLS, o.TLSVerify = tc, true, true
	})
	url := s.ClientURL()

	code, out := members(t, url, "--tlsca", f.ca, "--tlscert", f.clientCert, "--tlskey", f.clientKey)
	require.Equal(t, 0, code, out)
	assert.Contains(t, out, "(this tool)")

	// Without a client certificate, the server ends the handshake.
	code, out = members(t, url, "--tlsca", f.ca)
	assert.Equal(t, 1, code, out)
	assert.Contains(t, out, "connect to "+url+" (with --tlsca "+f.ca+"): ")

	// Without the CA, the client does not trust the server.
	code, out = members(t, url, "--tlscert", f.clientCert, "--tlskey", f.clientKey)
	assert.Equal(t, 1, code, out)
	assert.Contains(t, out, "certificate signed by unknown authority")
}

// The connection flags are checked before anything connects (--url points
// at no server): a usage error, or a file that cannot be read, fails at
// once with exit status 1, names the flag or the file, and prints no
// secret.
func TestConnFlagsErrors(t *testing.T) {
	dir := t.TempDir()
	missing := filepath.Join(dir, "missing.creds")
	garbage := filepath.Join(dir, "garbage")
	require.NoError(t, os.WriteFile(garbage, []byte("not a key\n"), 0o600))
	seed, _ := newUserSeedFile(t, dir, "user.nk")
	f := newTLSFiles(t)
	const nowhere = "nats://127.0.0.1:1"
	for _, tc := range []struct {
		name   string
		args   []string
		want   string
		secret string
	}{
		{"bench without --url", []string{"bench", "--token", "t0ken-abc"}, "--token: only with --url (the embedded cluster has neither authentication nor TLS)", "t0ken-abc"},
		{"bench without --url, several", []string{"bench", "fanout", "--user", "u", "--password", "pw-123", "--tlsca", f.ca}, "--user, --password, --tlsca: only with --url", "pw-123"},
		{"user and token", []string{"members", "--url", nowhere, "--user", "u", "--password", "pw-123", "--token", "t0ken-abc"}, "--user/--password and --token exclude each other", "pw-123"},
		{"creds and nkey", []string{"members", "--url", nowhere, "--creds", garbage, "--nkey", seed}, "--creds and --nkey exclude each other", ""},
		{"password alone", []string{"members", "--url", nowhere, "--password", "pw-123"}, "--password needs --user", "pw-123"},
		{"tlscert alone", []string{"members", "--url", nowhere, "--tlscert", f.clientCert}, "--tlscert and --tlskey go together", ""},
		{"credentials twice", []string{"members", "--url", "nats://u:pw-123@127.0.0.1:1", "--token", "t0ken-abc"}, "--token and credentials in --url exclude each other", "t0ken-abc"},
		{"credentials twice, bench", []string{"bench", "--url", "nats://t0ken-abc@127.0.0.1:1", "--nkey", seed}, "--nkey and credentials in --url exclude each other", "t0ken-abc"},
		{"missing creds", []string{"members", "--url", nowhere, "--creds", missing}, "--creds " + missing + ": open " + missing + ": no such file or directory", ""},
		{"malformed creds", []string{"members", "--url", nowhere, "--creds", garbage}, "--creds " + garbage + ": no user JWT found", ""},
		{"seed as creds", []string{"members", "--url", nowhere, "--creds", seed}, "--creds " + seed + ": no user JWT found", ""},
		{"missing nkey", []string{"pub", "t", "d", "--url", nowhere, "--nkey", missing}, "--nkey " + missing + ": nats: open " + missing, ""},
		{"malformed nkey", []string{"sub", "t", "--url", nowhere, "--nkey", garbage}, "--nkey " + garbage + ": ", ""},
		{"missing tlskey", []string{"events", "--url", nowhere, "--tlscert", f.clientCert, "--tlskey", missing}, "--tlskey " + missing + ": open " + missing, ""},
		{"key for another certificate", []string{"members", "--url", nowhere, "--tlscert", f.clientCert, "--tlskey", f.serverKey}, "private key does not match public key", ""},
		{"malformed tlsca", []string{"topics", "--url", nowhere, "--tlsca", garbage}, "--tlsca " + garbage + `: nats: failed to parse root certificate from "` + garbage + `"`, ""},
		{"missing tlsca, bench", []string{"bench", "--url", nowhere, "--tlsca", missing}, "--tlsca " + missing + ": ", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var out, errs bytes.Buffer
			start := time.Now()
			code := run(context.Background(), append(tc.args, "--timeout", "1m"), &out, &errs)
			assert.Equal(t, 1, code, errs.String())
			assert.Contains(t, errs.String(), tc.want)
			assert.NotContains(t, errs.String(), "connect to", "fails before connecting")
			assert.Less(t, time.Since(start), 10*time.Second, "fails at once")
			if tc.secret != "" {
				assert.NotContains(t, out.String()+errs.String(), tc.secret)
			}
		})
	}
}

// The --url usage names the flags; each flag's line gives its default, as
// TestClusterCommandsHelp and TestHelpListsEveryFlag check for every flag.
func TestConnFlagsHelp(t *testing.T) {
	var out, errs bytes.Buffer
	require.Equal(t, 0, run(context.Background(), []string{"help"}, &out, &errs), errs.String())
	help := strings.Join(strings.Fields(out.String()), " ") // unwrapped
	for _, name := range connFlagNames {
		assert.Contains(t, help, "--"+name+" ")
	}
	assert.Contains(t, help, "or given with --user and --password, --token, --creds or --nkey")
	assert.Contains(t, help, "only with --url: the embedded cluster has neither authentication nor TLS")
}

// The nats CLI's environment variables give the connection flags their
// defaults: used when no flag of their kind is given and --url holds no
// credentials, named in errors as $VARIABLE, never printing a secret.
func TestConnFlagsFromEnvironment(t *testing.T) {
	s := startAuthServer(t, func(o *server.Options) { o.Username, o.Password = "alice", "s3cret-pw" })
	url := s.ClientURL()

	t.Run("user and password", func(t *testing.T) {
		t.Setenv("NATS_USER", "alice")
		t.Setenv("NATS_PASSWORD", "s3cret-pw")
		code, out := members(t, url)
		require.Equal(t, 0, code, out)
		assert.Contains(t, out, "(this tool)")
		assert.NotContains(t, out, "s3cret-pw")
	})
	t.Run("wrong password named as from the environment", func(t *testing.T) {
		t.Setenv("NATS_USER", "alice")
		t.Setenv("NATS_PASSWORD", "wr0ng-pw")
		code, out := members(t, url)
		assert.Equal(t, 1, code, out)
		assert.Contains(t, out, `connect to `+url+` (as user "alice" (from $NATS_USER)): nats: Authorization Violation`)
		assert.NotContains(t, out, "wr0ng-pw")
	})
	t.Run("a flag of the kind overrides the environment", func(t *testing.T) {
		t.Setenv("NATS_USER", "mallory")
		t.Setenv("NATS_PASSWORD", "wr0ng-pw")
		t.Setenv("NATS_CREDS", filepath.Join(t.TempDir(), "missing.creds"))
		code, out := members(t, url, "--user", "alice", "--password", "s3cret-pw")
		require.Equal(t, 0, code, out)
	})
	t.Run("credentials in --url override the environment", func(t *testing.T) {
		t.Setenv("NATS_USER", "mallory")
		t.Setenv("NATS_PASSWORD", "wr0ng-pw")
		u := strings.Replace(url, "nats://", "nats://alice:s3cret-pw@", 1)
		code, out := members(t, u)
		require.Equal(t, 0, code, out)
		assert.NotContains(t, out, "s3cret-pw")
	})
	t.Run("bench's embedded cluster ignores the environment", func(t *testing.T) {
		t.Setenv("NATS_CREDS", filepath.Join(t.TempDir(), "missing.creds"))
		var out, errs bytes.Buffer
		code := run(context.Background(), []string{"bench", "fanout", "--count", "100", "--nodes", "2"}, &out, &errs)
		require.Equal(t, 0, code, errs.String())
		assert.Contains(t, out.String(), "fanout")
	})
	t.Run("bench with --url uses it", func(t *testing.T) {
		t.Setenv("NATS_USER", "alice")
		t.Setenv("NATS_PASSWORD", "s3cret-pw")
		var out, errs bytes.Buffer
		code := run(context.Background(), []string{"bench", "fanout", "--count", "100", "--nodes", "2", "--url", url}, &out, &errs)
		require.Equal(t, 0, code, errs.String())
		assert.Contains(t, out.String(), "fanout")
		assert.NotContains(t, out.String()+errs.String(), "s3cret-pw")
	})
}

// Errors about values from the environment name the variable; they are
// found before anything connects.
func TestConnFlagsFromEnvironmentErrors(t *testing.T) {
	dir := t.TempDir()
	missing := filepath.Join(dir, "missing.creds")
	seed, _ := newUserSeedFile(t, dir, "user.nk")
	f := newTLSFiles(t)
	const nowhere = "nats://127.0.0.1:1"
	for _, tc := range []struct {
		name string
		env  map[string]string
		args []string
		want string
	}{
		{"creds and nkey", map[string]string{"NATS_CREDS": missing, "NATS_NKEY": seed}, nil, "$NATS_CREDS and $NATS_NKEY exclude each other"},
		{"password alone", map[string]string{"NATS_PASSWORD": "pw-123"}, nil, "$NATS_PASSWORD needs --user"},
		{"certificate alone", map[string]string{"NATS_CERT": f.clientCert}, nil, "$NATS_CERT and --tlskey go together"},
		{"missing creds", map[string]string{"NATS_CREDS": missing}, nil, "$NATS_CREDS " + missing + ": open " + missing},
		{"missing CA, bench", map[string]string{"NATS_CA": missing}, []string{"bench"}, "$NATS_CA " + missing + ": "},
		{"a TLS flag leaves the variable's authentication", map[string]string{"NATS_NKEY": missing}, []string{"members", "--tlsca", f.ca}, "$NATS_NKEY " + missing + ": "},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			args := tc.args
			if args == nil {
				args = []string{"members"}
			}
			var out, errs bytes.Buffer
			code := run(context.Background(), append(args, "--url", nowhere, "--timeout", "1m"), &out, &errs)
			assert.Equal(t, 1, code, errs.String())
			assert.Contains(t, errs.String(), tc.want)
			assert.NotContains(t, errs.String(), "connect to", "fails before connecting")
			assert.NotContains(t, out.String()+errs.String(), "pw-123")
		})
	}
}

// --tlsfirst connects to a server that expects the TLS handshake before
// its greeting; without it the client waits for a greeting that never
// comes.
func TestConnFlagsTLSHandshakeFirst(t *testing.T) {
	f := newTLSFiles(t)
	tc, err := server.GenTLSConfig(&server.TLSConfigOpts{CertFile: f.serverCert, KeyFile: f.serverKey})
	require.NoError(t, err)
	s := startAuthServer(t, func(o *server.Options) {
		o.TLSConfig, o.TLS, o.TLSHandshakeFirst = tc, true, true
	})
	url := s.ClientURL()

	code, out := members(t, url, "--tlsca", f.ca, "--tlsfirst")
	require.Equal(t, 0, code, out)
	assert.Contains(t, out, "(this tool)")

	var o, e bytes.Buffer
	code = run(context.Background(), []string{"members", "--url", url, "--tlsca", f.ca, "--timeout", "1s"}, &o, &e)
	assert.Equal(t, 1, code, o.String())
	assert.Contains(t, e.String(), "connect to "+url+" (with --tlsca "+f.ca+"): ")
}

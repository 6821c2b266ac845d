// Command goftps uploads files over explicit FTPS the way Go FTP libraries do.
//
// It exists to test ftps-gateway with Go's crypto/tls, standard library only.
// Each upload opens a new passive data connection, sends STOR, writes the data and
// closes the data connection without ever reading from it: the pattern of
// jlaffaye/ftp and similar libraries, which truncates uploads on servers that send
// TLS 1.3 session tickets on data connections (the unread ticket turns the close
// into a TCP reset).
//
// File i (0-based) is called PREFIX%05d.bin; its size and content are
// deterministic, so a test can recompute them independently (see sizeOf and
// fillContent). The password comes from -password-file or the FTPS_PASSWORD
// environment variable, never from the command line. A JSON summary goes to
// stdout; the exit code is 0 when every upload succeeded, 1 otherwise, 2 on
// usage errors.
package main

import (
	"crypto/sha256"
	"crypto/sha512"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/textproto"
	"os"
	"regexp"
	"strconv"
	"strings"
	"time"
)

type options struct {
	addr       string
	user       string
	password   string
	caFile     string
	serverName string
	count      int
	size       int
	minSize    int
	sessions   int
	resume     bool
	tlsMax     string
	pasv       bool
	prefix     string
	timeout    time.Duration
}

// uploadResult describes one STOR as the client saw it.
type uploadResult struct {
	Name       string `json:"name"`
	Size       int    `json:"size"`
	SHA256     string `json:"sha256"`
	Session    int    `json:"session"`
	OK         bool   `json:"ok"`
	Reply      string `json:"reply,omitempty"`       // the final reply (or the first, if it refused)
	Error      string `json:"error,omitempty"`       // what went wrong on the client side
	TLSVersion string `json:"tls_version,omitempty"` // of the data connection
	Resumed    bool   `json:"resumed"`               // the data connection resumed a session
}

type summary struct {
	Attempted          int            `json:"attempted"`
	UploadsOK          int            `json:"uploads_ok"`
	Failures           []uploadResult `json:"failures"`
	Uploads            []uploadResult `json:"uploads"`
	ControlTLSVersions []string       `json:"control_tls_versions"`
	SessionErrors      []string       `json:"session_errors"`
}

var tlsVersionNames = map[uint16]string{
	tls.VersionTLS12: "TLSv1.2",
	tls.VersionTLS13: "TLSv1.3",
}

func main() {
	opts, err := parseFlags()
	if err != nil {
		fmt.Fprintln(os.Stderr, "goftps:", err)
		os.Exit(2)
	}
	tlsConfig, err := makeTLSConfig(opts)
	if err != nil {
		fmt.Fprintln(os.Stderr, "goftps:", err)
		os.Exit(2)
	}
	result := summary{Failures: []uploadResult{}, Uploads: []uploadResult{},
		ControlTLSVersions: []string{}, SessionErrors: []string{}}
	next := 0
	for session := 0; session < opts.sessions; session++ {
		// Spread the files evenly: the first sessions take one more if needed.
		share := opts.count / opts.sessions
		if session < opts.count%opts.sessions {
			share++
		}
		indices := make([]int, share)
		for k := range indices {
			indices[k] = next
			next++
		}
		runSession(opts, tlsConfig, session, indices, &result)
	}
	for _, upload := range result.Uploads {
		result.Attempted++
		if upload.OK {
			result.UploadsOK++
		} else {
			result.Failures = append(result.Failures, upload)
		}
	}
	out, _ := json.MarshalIndent(result, "", "  ")
	fmt.Println(string(out))
	if result.UploadsOK != opts.count || len(result.SessionErrors) > 0 {
		os.Exit(1)
	}
}

func parseFlags() (*options, error) {
	o := &options{}
	var passwordFile string
	flag.StringVar(&o.addr, "addr", "", "control address host:port (required)")
	flag.StringVar(&o.user, "user", "", "user name (required)")
	flag.StringVar(&passwordFile, "password-file", "", "file holding the password (else $FTPS_PASSWORD)")
	flag.StringVar(&o.caFile, "cafile", "", "PEM file of CA certificates to trust (required)")
	flag.StringVar(&o.serverName, "servername", "", "TLS server name (default: host of -addr); also the session cache key")
	flag.IntVar(&o.count, "count", 1, "number of files to upload")
	flag.IntVar(&o.size, "size", 65536, "file size in bytes (the largest, with -min-size)")
	flag.IntVar(&o.minSize, "min-size", -1, "smallest file size; sizes vary between -min-size and -size (default: all -size)")
	flag.IntVar(&o.sessions, "sessions", 1, "control sessions to spread the uploads over (one after the other)")
	flag.BoolVar(&o.resume, "resume", false, "resume the control connection's TLS session on data connections")
	flag.StringVar(&o.tlsMax, "tls-max", "1.3", "highest TLS version: 1.2 or 1.3")
	flag.BoolVar(&o.pasv, "pasv", false, "use PASV and the address it advertises instead of EPSV")
	flag.StringVar(&o.prefix, "prefix", "go-", "remote file name prefix")
	flag.DurationVar(&o.timeout, "timeout", 60*time.Second, "bound on every network step")
	flag.Parse()
	if flag.NArg() != 0 {
		return nil, fmt.Errorf("unexpected arguments: %v", flag.Args())
	}
	if o.addr == "" || o.user == "" || o.caFile == "" {
		return nil, errors.New("-addr, -user and -cafile are required")
	}
	if passwordFile != "" {
		data, err := os.ReadFile(passwordFile)
		if err != nil {
			return nil, err
		}
		o.password = strings.TrimRight(string(data), "\r\n")
	} else {
		o.password = os.Getenv("FTPS_PASSWORD")
	}
	if o.password == "" {
		return nil, errors.New("no password: use -password-file or FTPS_PASSWORD")
	}
	if o.minSize < 0 {
		o.minSize = o.size
	}
	if o.count < 0 || o.size < 0 || o.minSize > o.size || o.sessions < 1 {
		return nil, errors.New("need -count >= 0, 0 <= -min-size <= -size, -sessions >= 1")
	}
	if o.serverName == "" {
		host, _, err := net.SplitHostPort(o.addr)
		if err != nil {
			return nil, err
		}
		o.serverName = host
	}
	if o.tlsMax != "1.2" && o.tlsMax != "1.3" {
		return nil, errors.New("-tls-max must be 1.2 or 1.3")
	}
	return o, nil
}

func makeTLSConfig(o *options) (*tls.Config, error) {
	pem, err := os.ReadFile(o.caFile)
	if err != nil {
		return nil, err
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("%s: no PEM certificate found", o.caFile)
	}
	config := &tls.Config{
		RootCAs: roots,
		// Go keys its session cache by ServerName (else by host:port, which differs
		// for every data connection): set it, or nothing ever resumes.
		ServerName: o.serverName,
		MinVersion: tls.VersionTLS12,
		MaxVersion: tls.VersionTLS13,
	}
	if o.tlsMax == "1.2" {
		config.MaxVersion = tls.VersionTLS12
	}
	if o.resume {
		config.ClientSessionCache = tls.NewLRUClientSessionCache(32)
	}
	return config, nil
}

// sizeOf is the size of file i: deterministic, spread over [minSize, size].
func sizeOf(o *options, i int) int {
	span := o.size - o.minSize + 1
	return o.minSize + int((uint64(i)*2654435761)%uint64(span))
}

// fillContent writes the content of the file called name: SHA-512 of
// "name:block" for block = 0, 1, 2, ..., concatenated and cut to len(buf).
func fillContent(name string, buf []byte) {
	for block := 0; block*sha512.Size < len(buf); block++ {
		digest := sha512.Sum512([]byte(name + ":" + strconv.Itoa(block)))
		copy(buf[block*sha512.Size:], digest[:])
	}
}

type session struct {
	opts    *options
	config  *tls.Config
	control *tls.Conn
	text    *textproto.Conn
}

// expect sends a command (unless empty) and reads one reply, which must have the
// given class (1-5) as its first digit.
func (s *session) expect(class int, format string, args ...interface{}) (int, string, error) {
	s.control.SetDeadline(time.Now().Add(s.opts.timeout))
	if format != "" {
		if err := s.text.PrintfLine(format, args...); err != nil {
			return 0, "", err
		}
	}
	code, message, err := s.text.ReadResponse(class)
	return code, fmt.Sprintf("%d %s", code, message), err
}

func runSession(o *options, config *tls.Config, number int, indices []int, result *summary) {
	fail := func(err error) {
		result.SessionErrors = append(result.SessionErrors, fmt.Sprintf("session %d: %v", number, err))
		for _, i := range indices {
			name := fmt.Sprintf("%s%05d.bin", o.prefix, i)
			result.Uploads = append(result.Uploads, uploadResult{
				Name: name, Size: sizeOf(o, i), Session: number,
				Error: "not attempted: session failed",
			})
		}
	}
	raw, err := net.DialTimeout("tcp", o.addr, o.timeout)
	if err != nil {
		fail(err)
		return
	}
	defer raw.Close()
	raw.SetDeadline(time.Now().Add(o.timeout))
	plain := textproto.NewConn(raw)
	if _, _, err := plain.ReadResponse(2); err != nil {
		fail(fmt.Errorf("banner: %w", err))
		return
	}
	if err := plain.PrintfLine("AUTH TLS"); err != nil {
		fail(err)
		return
	}
	if _, _, err := plain.ReadResponse(234); err != nil {
		fail(fmt.Errorf("AUTH TLS: %w", err))
		return
	}
	control := tls.Client(raw, config)
	if err := control.Handshake(); err != nil {
		fail(fmt.Errorf("control TLS handshake: %w", err))
		return
	}
	result.ControlTLSVersions = append(result.ControlTLSVersions,
		tlsVersionNames[control.ConnectionState().Version])
	s := &session{opts: o, config: config, control: control, text: textproto.NewConn(control)}
	steps := []struct {
		class   int
		command string
	}{
		{3, "USER " + o.user}, {2, "PASS " + o.password}, {2, "PBSZ 0"},
		{2, "PROT P"}, {2, "TYPE I"},
	}
	for _, step := range steps {
		if _, reply, err := s.expect(step.class, "%s", step.command); err != nil {
			verb := strings.Fields(step.command)[0]
			fail(fmt.Errorf("%s: %v (%s)", verb, err, reply))
			return
		}
	}
	for _, i := range indices {
		upload := s.upload(i)
		upload.Session = number
		result.Uploads = append(result.Uploads, upload)
	}
	s.expect(2, "QUIT")
	control.Close()
}

var epsvPort = regexp.MustCompile(`\(\|\|\|(\d+)\|\)`)
var pasvAddress = regexp.MustCompile(`\((\d+),(\d+),(\d+),(\d+),(\d+),(\d+)\)`)

// dataAddress asks for a passive port and returns where to connect.
func (s *session) dataAddress() (string, string, error) {
	if s.opts.pasv {
		_, reply, err := s.expect(2, "PASV")
		if err != nil {
			return "", reply, err
		}
		m := pasvAddress.FindStringSubmatch(reply)
		if m == nil {
			return "", reply, errors.New("unparsable 227 reply")
		}
		hi, _ := strconv.Atoi(m[5])
		lo, _ := strconv.Atoi(m[6])
		host := strings.Join(m[1:5], ".")
		return net.JoinHostPort(host, strconv.Itoa(hi*256+lo)), reply, nil
	}
	_, reply, err := s.expect(2, "EPSV")
	if err != nil {
		return "", reply, err
	}
	m := epsvPort.FindStringSubmatch(reply)
	if m == nil {
		return "", reply, errors.New("unparsable 229 reply")
	}
	host, _, _ := net.SplitHostPort(s.opts.addr)
	return net.JoinHostPort(host, m[1]), reply, nil
}

func (s *session) upload(i int) uploadResult {
	name := fmt.Sprintf("%s%05d.bin", s.opts.prefix, i)
	data := make([]byte, sizeOf(s.opts, i))
	fillContent(name, data)
	digest := sha256.Sum256(data)
	r := uploadResult{Name: name, Size: len(data), SHA256: hex.EncodeToString(digest[:])}

	address, reply, err := s.dataAddress()
	if err != nil {
		r.Reply, r.Error = reply, fmt.Sprintf("passive: %v", err)
		return r
	}
	raw, err := net.DialTimeout("tcp", address, s.opts.timeout)
	if err != nil {
		r.Error = fmt.Sprintf("data connect: %v", err)
		// The server still waits for this connection; let it time the port out.
		return r
	}
	defer raw.Close()
	// TLS on the data connection starts as soon as STOR is sent, concurrently with
	// reading its 1xx reply: whichever order the server prefers (150 first, or the
	// handshake first), neither side waits for the other.
	dataConn := tls.Client(raw, s.config)
	dataConn.SetDeadline(time.Now().Add(s.opts.timeout))
	s.control.SetDeadline(time.Now().Add(s.opts.timeout))
	if err := s.text.PrintfLine("STOR %s", name); err != nil {
		r.Error = fmt.Sprintf("STOR: %v", err)
		return r
	}
	handshake := make(chan error, 1)
	go func() { handshake <- dataConn.Handshake() }()
	code, message, err := s.text.ReadResponse(1)
	if err != nil {
		raw.Close() // ends the handshake goroutine
		<-handshake
		r.Reply, r.Error = fmt.Sprintf("%d %s", code, message), fmt.Sprintf("STOR: %v", err)
		return r
	}
	// As Go FTP libraries do: write, then close. The data connection is never read,
	// so a ticket the server sends there stays unread.
	var writeErr error
	if err := <-handshake; err != nil {
		writeErr = fmt.Errorf("data TLS handshake: %w", err)
	} else {
		state := dataConn.ConnectionState()
		r.TLSVersion, r.Resumed = tlsVersionNames[state.Version], state.DidResume
		if _, err := dataConn.Write(data); err != nil {
			writeErr = fmt.Errorf("data write: %w", err)
		}
	}
	if err := dataConn.Close(); err != nil && writeErr == nil {
		writeErr = fmt.Errorf("data close: %w", err)
	}
	_, reply, err = s.expect(2, "")
	r.Reply = reply
	switch {
	case err != nil && writeErr != nil:
		r.Error = fmt.Sprintf("%v; final reply: %v", writeErr, err)
	case err != nil:
		r.Error = fmt.Sprintf("final reply: %v", err)
	case writeErr != nil:
		// The server says 2xx although the client could not send everything.
		r.Error = writeErr.Error()
	default:
		r.OK = true
	}
	return r
}

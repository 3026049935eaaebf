package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io/ioutil"
	"log"
	"net/http"
	"net/http/httptest"
	"reflect"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
	"github.com/vmware/govmomi/vim25/xml"
)

// frontHandler sits in front of vcsim's HTTP mux. It
//   - checks Login credentials against our user table (vcsim 0.24 knows a single pair),
//   - serves /sdk/vimServiceVersions.xml for the configured apiVersion with prior versions,
//   - completes CloneVM_Task where vcsim 0.24 falls short (placement, customization, powerOn,
//     device sharing between template and clone),
//   - makes the tasks of -task-delay methods asynchronous and serves CancelTask for them,
//   - checks basic auth credentials on the REST endpoints.
type frontHandler struct {
	next        http.Handler
	users       *userTable
	sim         *simState
	delays      *taskDelayer
	versionsXML []byte
	typeFunc    func(string) (reflect.Type, bool)
}

func newFrontHandler(next http.Handler, users *userTable, sim *simState, delays *taskDelayer, apiVersion string) http.Handler {
	return &frontHandler{
		next:        next,
		users:       users,
		sim:         sim,
		delays:      delays,
		versionsXML: serviceVersionsXML(apiVersion),
		typeFunc:    types.TypeFunc(),
	}
}

// knownAPIVersions in ascending order.
var knownAPIVersions = []string{
	"5.0", "5.1", "5.5", "6.0", "6.5", "6.7", "6.7.1", "6.7.2", "6.7.3",
	"7.0.0.0", "7.0.1.0", "7.0.2.0", "7.0.3.0",
	"8.0.0.0", "8.0.1.0", "8.0.2.0", "8.0.3.0", "9.0.0.0",
}

func versionKey(v string) []int {
	var key []int
	for _, p := range strings.Split(v, ".") {
		n, err := strconv.Atoi(p)
		if err != nil {
			n = 0
		}
		key = append(key, n)
	}
	for len(key) < 4 {
		key = append(key, 0)
	}
	return key
}

func versionLess(a, b string) bool {
	ka, kb := versionKey(a), versionKey(b)
	for i := 0; i < len(ka) && i < len(kb); i++ {
		if ka[i] != kb[i] {
			return ka[i] < kb[i]
		}
	}
	return len(ka) < len(kb)
}

func serviceVersionsXML(apiVersion string) []byte {
	var prior []string
	for _, v := range knownAPIVersions {
		if versionLess(v, apiVersion) {
			prior = append(prior, v)
		}
	}
	sort.Slice(prior, func(i, j int) bool { return versionLess(prior[j], prior[i]) })
	var b bytes.Buffer
	b.WriteString(`<?xml version="1.0" encoding="UTF-8" ?>` + "\n")
	b.WriteString("<namespaces version=\"1.0\">\n <namespace>\n  <name>urn:vim25</name>\n")
	fmt.Fprintf(&b, "  <version>%s</version>\n  <priorVersions>\n", apiVersion)
	for _, v := range prior {
		fmt.Fprintf(&b, "   <version>%s</version>\n", v)
	}
	b.WriteString("  </priorVersions>\n </namespace>\n</namespaces>\n")
	return b.Bytes()
}

func (h *frontHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	path := r.URL.Path
	switch {
	case path == "/sdk/vimServiceVersions.xml":
		w.Header().Set("Content-Type", "text/xml")
		_, _ = w.Write(h.versionsXML)
		return
	case r.Method == http.MethodPost && (path == "/sdk" || path == "/sdk/vimService"):
		h.serveSDK(w, r)
		return
	case strings.HasPrefix(path, "/rest/") || strings.HasPrefix(path, "/api/"):
		if u, p, ok := r.BasicAuth(); ok && !h.users.valid(u, p) {
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
	}
	h.next.ServeHTTP(w, r)
}

const invalidLoginEnvelope = `<?xml version="1.0" encoding="UTF-8"?>` +
	`<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"><soapenv:Body>` +
	`<Login xmlns="urn:vim25"><_this type="SessionManager">%s</_this><userName>%s</userName><password></password></Login>` +
	`</soapenv:Body></soapenv:Envelope>`

func xmlEscape(s string) string {
	var b bytes.Buffer
	_ = xml.EscapeText(&b, []byte(s))
	return b.String()
}

func (h *frontHandler) serveSDK(w http.ResponseWriter, r *http.Request) {
	body, err := ioutil.ReadAll(r.Body)
	_ = r.Body.Close()
	if err != nil {
		w.WriteHeader(http.StatusBadRequest)
		return
	}
	var method string
	var this types.ManagedObjectReference
	if h.delays.active() {
		method, this = soapCall(body)
		if method == "CancelTask" && h.delays.owns(this) {
			h.serveCancelTask(w, r, this)
			return
		}
	}
	var clone *types.CloneVM_Task
	if bytes.Contains(body, []byte("Login")) || bytes.Contains(body, []byte("CloneVM_Task")) {
		if call, err := simulator.UnmarshalBody(h.typeFunc, body); err == nil {
			switch req := call.Body.(type) {
			case *types.Login:
				if !h.users.valid(req.UserName, req.Password) {
					// Let vcsim answer with its own InvalidLogin fault (it rejects empty passwords).
					body = []byte(fmt.Sprintf(invalidLoginEnvelope, xmlEscape(call.This.Value), xmlEscape(req.UserName)))
				}
			case *types.CloneVM_Task:
				clone = req
			}
		}
	}
	r.Body = ioutil.NopCloser(bytes.NewReader(body))
	r.ContentLength = int64(len(body))

	if clone != nil {
		target := cloneTarget{folder: clone.Folder, name: clone.Name}
		if taken := claimCloneTarget(target); taken != nil {
			h.serveDuplicateClone(w, r, clone, *taken)
			return
		}
		var task *types.ManagedObjectReference
		defer func() { settleCloneTarget(target, task) }()
		h.serveClone(w, r, clone, method, this, &task)
		return
	}

	if method == "Logout" {
		key := ""
		if c, err := r.Cookie(soap.SessionCookieName); err == nil {
			key = c.Value
		}
		h.next.ServeHTTP(w, r)
		if key != "" {
			forgetSessionCollectors(key)
		}
		return
	}

	if method == "FindByInventoryPath" || method == "FindChild" {
		h.serveLookup(w, r, body)
		return
	}

	h.serveClone(w, r, nil, method, this, nil)
}

// serveClone serves a call that may be delayed (-task-delay) and/or a CloneVM_Task (clone
// non-nil); *task gets the task a clone call returned.
func (h *frontHandler) serveClone(w http.ResponseWriter, r *http.Request, clone *types.CloneVM_Task,
	method string, this types.ManagedObjectReference, task **types.ManagedObjectReference) {
	delay := h.delays.delayFor(method)
	if clone == nil && delay <= 0 {
		h.next.ServeHTTP(w, r)
		return
	}

	var around func(taskExecute, *simulator.Task) (types.AnyType, types.BaseMethodFault)
	if clone != nil {
		around = cloneDevicesFix(clone.This, clone.Spec.Config)
		method, this = "CloneVM_Task", clone.This
	}
	arm := h.delays.arm(method, this, delay, around)
	if clone != nil && delay > 0 {
		// The clone is made when the delayed task executes: finish it right after, before
		// the task reports success.
		arm.after = func(res types.AnyType, fault types.BaseMethodFault) {
			if vmRef, ok := res.(types.ManagedObjectReference); ok && fault == nil {
				h.sim.finishClone(clone, vmRef)
			}
		}
	}

	rec := httptest.NewRecorder()
	h.next.ServeHTTP(rec, r)
	h.delays.disarm(arm)
	out := arm.rewrite(rec.Body.Bytes())
	if clone != nil && rec.Code == http.StatusOK {
		if ref := taskRefFromResponse(out); ref != nil {
			*task = ref
			if delay <= 0 {
				h.sim.afterClone(clone, *ref)
			}
		}
	}
	for k, v := range rec.Header() {
		w.Header()[k] = v
	}
	w.Header().Del("Content-Length")
	w.WriteHeader(rec.Code)
	_, _ = w.Write(out)
}

// inventoryMu orders SearchIndex lookups (shared) and the work of CloneVM_Task (exclusive).
var inventoryMu sync.RWMutex

// serveLookup serves a SearchIndex lookup (only with -task-delay). vcsim 0.24 puts a new VM
// into its folder before it has a name and fills it in without the folder's lock (createVM
// sets the name last), while FindChild reads the children without their locks: a lookup that
// walks the folder meanwhile races and panics ("... does not have a Name"; the client loses
// its connection). Delayed tasks create VMs while clients poll FindByInventoryPath, so lookups
// wait for clones in progress (inventoryMu), and are retried if a VM created some other way
// (CreateVM_Task, RegisterVM_Task) makes them panic: nothing was written or changed yet.
func (h *frontHandler) serveLookup(w http.ResponseWriter, r *http.Request, body []byte) {
	for attempt := 1; ; attempt++ {
		r.Body = ioutil.NopCloser(bytes.NewReader(body))
		rec := httptest.NewRecorder()
		x := catch(func() {
			inventoryMu.RLock()
			defer inventoryMu.RUnlock()
			h.next.ServeHTTP(rec, r)
		})
		if x == nil {
			for k, v := range rec.Header() {
				w.Header()[k] = v
			}
			w.WriteHeader(rec.Code)
			_, _ = w.Write(rec.Body.Bytes())
			return
		}
		if attempt >= 200 || !strings.Contains(fmt.Sprint(x), "does not have a Name") {
			panic(x)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// soapCall returns the method name and _this of a SOAP request (empty if it can't be parsed).
func soapCall(body []byte) (string, types.ManagedObjectReference) {
	var this types.ManagedObjectReference
	dec := xml.NewDecoder(bytes.NewReader(body))
	inBody, method, inThis := false, "", false
	for {
		tok, err := dec.Token()
		if err != nil {
			return method, this
		}
		switch t := tok.(type) {
		case xml.StartElement:
			switch {
			case !inBody:
				inBody = t.Name.Local == "Body"
			case method == "":
				method = t.Name.Local
			case t.Name.Local == "_this":
				inThis = true
				for _, attr := range t.Attr {
					if attr.Name.Local == "type" {
						this.Type = attr.Value
					}
				}
			default:
				return method, this
			}
		case xml.CharData:
			if inThis {
				this.Value += strings.TrimSpace(string(t))
			}
		case xml.EndElement:
			if inThis {
				return method, this
			}
			if method != "" && t.Name.Local == method {
				return method, this
			}
		}
	}
}

const soapEnvelopeHead = `<?xml version="1.0" encoding="UTF-8"?>` + "\n" +
	`<soapenv:Envelope xmlns:soapenc="http://schemas.xmlsoap.org/soap/encoding/" ` +
	`xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsd="http://www.w3.org/2001/XMLSchema" ` +
	`xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>`

const soapEnvelopeTail = `</soapenv:Body></soapenv:Envelope>`

const currentTimeEnvelope = `<?xml version="1.0" encoding="UTF-8"?>` +
	`<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"><soapenv:Body>` +
	`<CurrentTime xmlns="urn:vim25"><_this type="ServiceInstance">ServiceInstance</_this></CurrentTime>` +
	`</soapenv:Body></soapenv:Envelope>`

// serveCancelTask answers CancelTask on a delayed task (vcsim 0.24 has no CancelTask).
func (h *frontHandler) serveCancelTask(w http.ResponseWriter, r *http.Request, ref types.ManagedObjectReference) {
	if !h.checkSession(w, r) {
		return
	}

	msg, fault := h.delays.cancelTask(ref)
	var b bytes.Buffer
	b.WriteString(soapEnvelopeHead)
	code := http.StatusOK
	if fault != nil {
		code = http.StatusInternalServerError
		kind := reflect.TypeOf(fault).Elem().Name()
		fmt.Fprintf(&b, `<soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>%s</faultstring>`+
			`<detail><%sFault xmlns="urn:vim25" xsi:type="%s"></%sFault></detail></soapenv:Fault>`,
			xmlEscape(msg), kind, kind, kind)
	} else {
		b.WriteString(`<CancelTaskResponse xmlns="urn:vim25"></CancelTaskResponse>`)
	}
	b.WriteString(soapEnvelopeTail)
	w.Header().Set("Content-Type", "text/xml; charset=utf-8")
	w.WriteHeader(code)
	_, _ = w.Write(b.Bytes())
}

var taskRefRE = regexp.MustCompile(`<returnval type="Task">([^<]+)</returnval>`)

func taskRefFromResponse(body []byte) *types.ManagedObjectReference {
	m := taskRefRE.FindSubmatch(body)
	if m == nil {
		return nil
	}
	return &types.ManagedObjectReference{Type: "Task", Value: string(m[1])}
}

// copyDevices deep-copies a device list (through XML, like vcsim's own deepCopy).
func copyDevices(devices []types.BaseVirtualDevice) []types.BaseVirtualDevice {
	src := types.ArrayOfVirtualDevice{VirtualDevice: devices}
	b, err := xml.Marshal(src)
	if err != nil {
		log.Printf("copying devices: %v", err)
		return nil
	}
	var dst types.ArrayOfVirtualDevice
	dec := xml.NewDecoder(bytes.NewReader(b))
	dec.TypeFunc = types.TypeFunc()
	if err := dec.Decode(&dst); err != nil {
		log.Printf("copying devices: %v", err)
		return nil
	}
	return dst.VirtualDevice
}

func randomMAC() string {
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	return fmt.Sprintf("00:50:56:%02x:%02x:%02x", b[0]&0x3f, b[1], b[2])
}

func computeResourceOf(ref types.ManagedObjectReference) *types.ManagedObjectReference {
	cur := &ref
	for cur != nil {
		switch cur.Type {
		case "ClusterComputeResource", "ComputeResource":
			return cur
		}
		cur = parentOf(*cur)
	}
	return nil
}

func computeResourceHosts(ref types.ManagedObjectReference) []types.ManagedObjectReference {
	switch cr := simulator.Map.Get(ref).(type) {
	case *simulator.ClusterComputeResource:
		return append([]types.ManagedObjectReference(nil), cr.Host...)
	case *mo.ComputeResource:
		return append([]types.ManagedObjectReference(nil), cr.Host...)
	}
	return nil
}

func containsRef(refs []types.ManagedObjectReference, ref types.ManagedObjectReference) bool {
	for _, r := range refs {
		if r == ref {
			return true
		}
	}
	return false
}

// cloneDevicesFix returns the "around" hook of a CloneVM_Task's work. vcsim copies the
// source's device objects by pointer (so the clone and the source share them, the source's
// disk loses its file name and MACs are duplicated): the hook snapshots the source's devices,
// runs the clone, gives the clone its own devices (with new MAC addresses) and restores the
// source's. It runs with the source locked (as vcsim runs the task), so that concurrent clones
// of one source neither race nor snapshot each other's half-done state.
func cloneDevicesFix(source types.ManagedObjectReference, config *types.VirtualMachineConfigSpec) func(taskExecute, *simulator.Task) (types.AnyType, types.BaseMethodFault) {
	return func(execute taskExecute, t *simulator.Task) (types.AnyType, types.BaseMethodFault) {
		src, _ := simulator.Map.Get(source).(*simulator.VirtualMachine)
		var saved []types.BaseVirtualDevice
		if src != nil && src.Config != nil {
			saved = copyDevices(src.Config.Hardware.Device)
		}
		inventoryMu.Lock() // see serveLookup
		res, fault := execute(t)
		if vmRef, ok := res.(types.ManagedObjectReference); ok && fault == nil {
			if vm, ok := simulator.Map.Get(vmRef).(*simulator.VirtualMachine); ok {
				applyCloneConfig(vm, config)
			}
		}
		inventoryMu.Unlock()
		if vmRef, ok := res.(types.ManagedObjectReference); ok && fault == nil && saved != nil {
			if vm, ok := simulator.Map.Get(vmRef).(*simulator.VirtualMachine); ok {
				swapCloneDevices(src, vm, saved)
			}
		}
		return res, fault
	}
}

// swapCloneDevices: see cloneDevicesFix. The caller holds src's lock.
func swapCloneDevices(src, vm *simulator.VirtualMachine, saved []types.BaseVirtualDevice) {
	srcMACs := map[string]bool{}
	for _, d := range saved {
		if c, ok := d.(types.BaseVirtualEthernetCard); ok {
			srcMACs[strings.ToLower(c.GetVirtualEthernetCard().MacAddress)] = true
		}
	}
	simulator.Map.WithLock(vm, func() {
		devices := copyDevices(vm.Config.Hardware.Device)
		if devices == nil {
			return
		}
		guestNet := append([]types.GuestNicInfo(nil), vm.Guest.Net...)
		for _, d := range devices {
			c, ok := d.(types.BaseVirtualEthernetCard)
			if !ok {
				continue
			}
			card := c.GetVirtualEthernetCard()
			if srcMACs[strings.ToLower(card.MacAddress)] {
				card.MacAddress = randomMAC()
				card.AddressType = string(types.VirtualEthernetCardMacTypeGenerated)
			}
			for i := range guestNet {
				if guestNet[i].DeviceConfigId == card.Key {
					guestNet[i].MacAddress = card.MacAddress
				}
			}
		}
		simulator.Map.Update(vm, []types.PropertyChange{
			{Name: "config.hardware.device", Val: devices},
			{Name: "guest.net", Val: guestNet},
		})
	})
	simulator.Map.Update(src, []types.PropertyChange{{Name: "config.hardware.device", Val: saved}})
}

// afterClone finishes the VM created by vcsim's (synchronous) CloneVM_Task.
func (s *simState) afterClone(req *types.CloneVM_Task, taskRef types.ManagedObjectReference) {
	task, ok := simulator.Map.Get(taskRef).(*simulator.Task)
	if !ok {
		return
	}
	var state types.TaskInfoState
	var result types.AnyType
	simulator.Map.WithLock(task, func() { state, result = task.Info.State, task.Info.Result })
	if state != types.TaskInfoStateSuccess {
		return
	}
	if vmRef, ok := result.(types.ManagedObjectReference); ok {
		s.finishClone(req, vmRef)
	}
}

// finishClone does what vcsim's CloneVM_Task leaves out (placement, customization, powerOn),
// once the clone exists. No locks are held.
func (s *simState) finishClone(req *types.CloneVM_Task, vmRef types.ManagedObjectReference) {
	vm, ok := simulator.Map.Get(vmRef).(*simulator.VirtualMachine)
	if !ok {
		return
	}

	// 1. Placement: vcsim keeps the source's host even when the pool is in another cluster,
	//    and ignores spec.location.host.
	var target *types.ManagedObjectReference
	if h := req.Spec.Location.Host; h != nil {
		if _, ok := simulator.Map.Get(*h).(*simulator.HostSystem); ok {
			target = h
		}
	} else if vm.ResourcePool != nil && vm.Runtime.Host != nil {
		if cr := computeResourceOf(*vm.ResourcePool); cr != nil {
			hosts := computeResourceHosts(*cr)
			if !containsRef(hosts, *vm.Runtime.Host) {
				target = pickHost(hosts, vm.Datastore)
			}
		}
	}
	if target != nil && vm.Runtime.Host != nil && *target != *vm.Runtime.Host {
		moveVM(vm, *target)
	}

	ctx := context.Background()
	obj := object.NewVirtualMachine(s.client, vmRef)

	// 2. Guest customization given in the clone spec (vcsim 0.24 ignores it).
	if req.Spec.Customization != nil {
		t, err := obj.Customize(ctx, *req.Spec.Customization)
		if err == nil {
			err = t.Wait(ctx)
		}
		if err != nil {
			log.Printf("clone %s: customization: %v", req.Name, err)
		}
	}

	// 3. spec.powerOn (vcsim 0.24 ignores it).
	if req.Spec.PowerOn {
		t, err := obj.PowerOn(ctx)
		if err == nil {
			err = t.Wait(ctx)
		}
		if err != nil {
			log.Printf("clone %s: power on: %v", req.Name, err)
		}
	}
}

// pickHost chooses the host with the fewest VMs that mounts the given datastores.
func pickHost(hosts []types.ManagedObjectReference, datastores []types.ManagedObjectReference) *types.ManagedObjectReference {
	var best *simulator.HostSystem
	for _, ref := range hosts {
		h, ok := simulator.Map.Get(ref).(*simulator.HostSystem)
		if !ok {
			continue
		}
		mounted := true
		for _, ds := range datastores {
			if !containsRef(h.Datastore, ds) {
				mounted = false
				break
			}
		}
		if !mounted {
			continue
		}
		if best == nil || len(h.Vm) < len(best.Vm) || (len(h.Vm) == len(best.Vm) && h.Name < best.Name) {
			best = h
		}
	}
	if best == nil {
		return nil
	}
	ref := best.Self
	return &ref
}

func moveVM(vm *simulator.VirtualMachine, target types.ManagedObjectReference) {
	if old, ok := simulator.Map.Get(*vm.Runtime.Host).(*simulator.HostSystem); ok {
		simulator.Map.RemoveReference(old, &old.Vm, vm.Self)
	}
	if nh, ok := simulator.Map.Get(target).(*simulator.HostSystem); ok {
		simulator.Map.AddReference(nh, &nh.Vm, vm.Self)
	}
	t := target
	changes := []types.PropertyChange{
		{Name: "runtime.host", Val: &t},
		{Name: "summary.runtime.host", Val: &t},
	}
	if cr := computeResourceOf(target); cr != nil {
		if c, ok := simulator.Map.Get(*cr).(*simulator.ClusterComputeResource); ok && c.EnvironmentBrowser != nil {
			changes = append(changes, types.PropertyChange{Name: "environmentBrowser", Val: *c.EnvironmentBrowser})
		}
	}
	simulator.Map.WithLock(vm, func() { simulator.Map.Update(vm, changes) })
}

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

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
	"github.com/vmware/govmomi/vim25/xml"
)

// frontHandler sits in front of vcsim's HTTP mux. It
//   - checks Login credentials against our user table (vcsim 0.24 knows a single pair),
//   - serves /sdk/vimServiceVersions.xml for the configured apiVersion with prior versions,
//   - completes CloneVM_Task where vcsim 0.24 falls short (placement, customization, powerOn,
//     device sharing between template and clone),
//   - checks basic auth credentials on the REST endpoints.
type frontHandler struct {
	next        http.Handler
	users       *userTable
	sim         *simState
	versionsXML []byte
	typeFunc    func(string) (reflect.Type, bool)
}

func newFrontHandler(next http.Handler, users *userTable, sim *simState, apiVersion string) http.Handler {
	return &frontHandler{
		next:        next,
		users:       users,
		sim:         sim,
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
	var clone *types.CloneVM_Task
	if bytes.Contains(body, []byte("Login")) || bytes.Contains(body, []byte("CloneVM_Task")) {
		if method, err := simulator.UnmarshalBody(h.typeFunc, body); err == nil {
			switch req := method.Body.(type) {
			case *types.Login:
				if !h.users.valid(req.UserName, req.Password) {
					// Let vcsim answer with its own InvalidLogin fault (it rejects empty passwords).
					body = []byte(fmt.Sprintf(invalidLoginEnvelope, xmlEscape(method.This.Value), xmlEscape(req.UserName)))
				}
			case *types.CloneVM_Task:
				clone = req
			}
		}
	}
	r.Body = ioutil.NopCloser(bytes.NewReader(body))
	r.ContentLength = int64(len(body))

	if clone == nil {
		h.next.ServeHTTP(w, r)
		return
	}

	source := types.ManagedObjectReference{}
	var saved []types.BaseVirtualDevice
	if vm, ok := simulator.Map.Get(clone.This).(*simulator.VirtualMachine); ok {
		source = vm.Self
		simulator.Map.WithLock(vm, func() { saved = copyDevices(vm.Config.Hardware.Device) })
	}

	rec := httptest.NewRecorder()
	h.next.ServeHTTP(rec, r)
	if rec.Code == http.StatusOK {
		if ref := taskRefFromResponse(rec.Body.Bytes()); ref != nil {
			h.sim.afterClone(clone, source, saved, *ref)
		}
	}
	for k, v := range rec.Header() {
		w.Header()[k] = v
	}
	w.WriteHeader(rec.Code)
	_, _ = w.Write(rec.Body.Bytes())
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

// afterClone fixes up the VM created by vcsim's CloneVM_Task.
func (s *simState) afterClone(req *types.CloneVM_Task, source types.ManagedObjectReference, saved []types.BaseVirtualDevice, taskRef types.ManagedObjectReference) {
	task, ok := simulator.Map.Get(taskRef).(*simulator.Task)
	if !ok || task.Info.State != types.TaskInfoStateSuccess {
		return
	}
	vmRef, ok := task.Info.Result.(types.ManagedObjectReference)
	if !ok {
		return
	}
	vm, ok := simulator.Map.Get(vmRef).(*simulator.VirtualMachine)
	if !ok {
		return
	}

	// 1. vcsim copies the source's device objects by pointer: give the clone its own devices
	//    (with new MAC addresses) and restore the source's.
	if src, ok := simulator.Map.Get(source).(*simulator.VirtualMachine); ok && saved != nil {
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
		simulator.Map.WithLock(src, func() {
			simulator.Map.Update(src, []types.PropertyChange{{Name: "config.hardware.device", Val: saved}})
		})
	}

	// 2. Placement: vcsim keeps the source's host even when the pool is in another cluster,
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

	// 3. Guest customization given in the clone spec (vcsim 0.24 ignores it).
	if req.Spec.Customization != nil {
		t, err := obj.Customize(ctx, *req.Spec.Customization)
		if err == nil {
			err = t.Wait(ctx)
		}
		if err != nil {
			log.Printf("clone %s: customization: %v", req.Name, err)
		}
	}

	// 4. spec.powerOn (vcsim 0.24 ignores it).
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

package main

import (
	"sort"
	"strings"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// Built-in role ids, as vSphere defines them.
const (
	roleAdmin     int32 = -1
	roleReadOnly  int32 = -2
	roleView      int32 = -3
	roleAnonymous int32 = -4
	roleNoAccess  int32 = -5
)

// systemPrivileges are granted to anyone holding any role (except NoAccess) on an entity.
var systemPrivileges = []string{"System.Anonymous", "System.Read", "System.View"}

// extraPrivileges are vSphere 7/8 privilege ids missing from govmomi 0.24's recorded role list.
var extraPrivileges = []string{
	"Cns.Searchable",
	"Cryptographer.ReadKeyServersInfo",
	"InventoryService.Tagging.ObjectAttachable",
	"Namespaces.Configure",
	"Namespaces.ListAccess",
	"Namespaces.Manage",
	"Namespaces.ModifyConfiguration",
	"Namespaces.SelfServiceManage",
	"Namespaces.Upgrade",
	"StorageProfile.Apply",
	"StorageProfile.Update",
	"StorageProfile.View",
	"Vsan.Cluster.ShallowRekey",
}

// normalizePrincipal makes principals comparable: case-insensitive, DOMAIN\user == user@domain.
func normalizePrincipal(p string) string {
	p = strings.ToLower(strings.TrimSpace(p))
	if i := strings.Index(p, `\`); i >= 0 {
		domain, user := p[:i], p[i+1:]
		if domain == "" {
			return user
		}
		return user + "@" + domain
	}
	return p
}

// authzManager replaces vcsim's AuthorizationManager, which grants everything to everyone.
// It embeds the vcsim type by value (the property collector requires the first field to
// lead to the mo type), and keeps its own permission store.
type authzManager struct {
	simulator.AuthorizationManager

	perms      map[types.ManagedObjectReference][]types.Permission
	known      map[string]bool
	allPrivs   []string
	nextRoleID int32
}

// builtinPrincipals is vcsim's DefaultUserGroup as it was before we added our users.
var builtinPrincipals []*types.UserSearchResult

// registerDirectoryUsers adds our users to vcsim's UserDirectory (must run before Model.Create).
func registerDirectoryUsers(users *userTable) {
	builtinPrincipals = append([]*types.UserSearchResult(nil), simulator.DefaultUserGroup...)
	for _, name := range users.names {
		simulator.DefaultUserGroup = append(simulator.DefaultUserGroup, &types.UserSearchResult{
			Principal: name,
			FullName:  name,
			Group:     false,
		})
	}
}

func installAuthorizationManager(o *options, users *userTable) (*authzManager, error) {
	content := simulator.Map.Get(vim25.ServiceInstance).(*simulator.ServiceInstance).Content
	orig := simulator.Map.Get(*content.AuthorizationManager).(*simulator.AuthorizationManager)

	m := &authzManager{
		AuthorizationManager: *orig,
		perms:                map[types.ManagedObjectReference][]types.Permission{},
		known:                map[string]bool{},
		nextRoleID:           1,
	}

	for _, role := range m.RoleList {
		for _, id := range role.Privilege {
			m.known[id] = true
		}
		if role.RoleId >= m.nextRoleID {
			m.nextRoleID = role.RoleId + 1
		}
	}
	for _, id := range extraPrivileges {
		m.known[id] = true
	}
	for _, id := range o.ExtraPrivileges {
		m.known[id] = true
	}
	for id := range m.known {
		m.allPrivs = append(m.allPrivs, id)
	}
	sort.Strings(m.allPrivs)

	m.PrivilegeList = nil
	for _, id := range m.allPrivs {
		group, name := "", id
		if i := strings.LastIndex(id, "."); i > 0 {
			group, name = id[:i], id[i+1:]
		}
		m.PrivilegeList = append(m.PrivilegeList, types.AuthorizationPrivilege{
			PrivId:        id,
			Name:          name,
			PrivGroupName: group,
		})
	}
	roles := make([]types.AuthorizationRole, len(m.RoleList))
	copy(roles, m.RoleList)
	for i := range roles {
		if roles[i].RoleId == roleAdmin {
			roles[i].Privilege = append([]string(nil), m.allPrivs...)
		}
	}
	m.RoleList = roles

	// Permissions: vcsim's built-in ones on the root folder (Admin for root/admin), except
	// for principals that collide with our extra users, plus Admin for the primary user.
	root := content.RootFolder
	extra := map[string]bool{}
	for _, name := range users.names[1:] {
		extra[normalizePrincipal(name)] = true
	}
	for _, u := range builtinPrincipals {
		if !u.Group && extra[normalizePrincipal(u.Principal)] {
			continue
		}
		m.perms[root] = append(m.perms[root], types.Permission{
			Entity:    &root,
			Principal: u.Principal,
			Group:     u.Group,
			RoleId:    roleAdmin,
			Propagate: true,
		})
	}
	m.setPermission(root, types.Permission{Principal: users.primary, RoleId: roleAdmin, Propagate: true})

	simulator.Map.Put(m)
	return m, nil
}

func (m *authzManager) role(id int32) *types.AuthorizationRole {
	for i := range m.RoleList {
		if m.RoleList[i].RoleId == id {
			return &m.RoleList[i]
		}
	}
	return nil
}

func (m *authzManager) setPermission(entity types.ManagedObjectReference, p types.Permission) {
	e := entity
	p.Entity = &e
	list := m.perms[entity]
	key := normalizePrincipal(p.Principal)
	for i := range list {
		if list[i].Group == p.Group && normalizePrincipal(list[i].Principal) == key {
			list[i] = p
			m.perms[entity] = list
			return
		}
	}
	m.perms[entity] = append(list, p)
}

func parentOf(ref types.ManagedObjectReference) *types.ManagedObjectReference {
	e, ok := simulator.Map.Get(ref).(mo.Entity)
	if !ok {
		return nil
	}
	return e.Entity().Parent
}

// effectiveRole returns the role of user on entity: the user's permission on the entity itself,
// else the one on the nearest ancestor whose permission propagates.
func (m *authzManager) effectiveRole(user string, entity types.ManagedObjectReference) (int32, bool) {
	key := normalizePrincipal(user)
	ref := &entity
	for depth := 0; ref != nil && depth < 256; depth++ {
		for _, p := range m.perms[*ref] {
			if p.Group || normalizePrincipal(p.Principal) != key {
				continue
			}
			if depth == 0 || p.Propagate {
				return p.RoleId, true
			}
		}
		ref = parentOf(*ref)
	}
	return 0, false
}

// privileges returns the privileges user holds on entity (admin == true means all of them).
func (m *authzManager) privileges(user string, entity types.ManagedObjectReference) (set map[string]bool, admin bool) {
	set = map[string]bool{}
	id, ok := m.effectiveRole(user, entity)
	if !ok || id == roleNoAccess {
		return set, false
	}
	if id == roleAdmin {
		return set, true
	}
	for _, p := range systemPrivileges {
		set[p] = true
	}
	if r := m.role(id); r != nil {
		for _, p := range r.Privilege {
			set[p] = true
		}
	}
	return set, false
}

func (m *authzManager) granted(user string, entity types.ManagedObjectReference, privIDs []string) []types.PrivilegeAvailability {
	set, admin := m.privileges(user, entity)
	res := make([]types.PrivilegeAvailability, 0, len(privIDs))
	for _, id := range privIDs {
		res = append(res, types.PrivilegeAvailability{PrivId: id, IsGranted: admin || set[id]})
	}
	return res
}

// sessionUser resolves a session id to its user name.
func sessionUser(ctx *simulator.Context, id string) (string, bool) {
	if ctx.Session == nil {
		return "", false
	}
	if id == "" || id == ctx.Session.Key {
		return ctx.Session.UserName, true
	}
	content := simulator.Map.Get(vim25.ServiceInstance).(*simulator.ServiceInstance).Content
	if sm, ok := ctx.Session.Get(*content.SessionManager).(*simulator.SessionManager); ok {
		for _, s := range sm.SessionList {
			if s.Key == id {
				return s.UserName, true
			}
		}
	}
	return "", false
}

func entityExists(ref types.ManagedObjectReference) bool {
	_, ok := simulator.Map.Get(ref).(mo.Entity)
	return ok
}

func notFound(ref types.ManagedObjectReference) *soap.Fault {
	return simulator.Fault("", &types.ManagedObjectNotFound{Obj: ref})
}

func (m *authzManager) HasPrivilegeOnEntities(ctx *simulator.Context, req *types.HasPrivilegeOnEntities) soap.HasFault {
	body := new(methods.HasPrivilegeOnEntitiesBody)
	user, ok := sessionUser(ctx, req.SessionId)
	if !ok {
		body.Fault_ = simulator.Fault("session not found: "+req.SessionId, &types.NotFound{})
		return body
	}
	res := []types.EntityPrivilege{}
	for _, e := range req.Entity {
		if !entityExists(e) {
			body.Fault_ = notFound(e)
			return body
		}
		res = append(res, types.EntityPrivilege{Entity: e, PrivAvailability: m.granted(user, e, req.PrivId)})
	}
	body.Res = &types.HasPrivilegeOnEntitiesResponse{Returnval: res}
	return body
}

func (m *authzManager) HasPrivilegeOnEntity(ctx *simulator.Context, req *types.HasPrivilegeOnEntity) soap.HasFault {
	body := new(methods.HasPrivilegeOnEntityBody)
	user, ok := sessionUser(ctx, req.SessionId)
	if !ok {
		body.Fault_ = simulator.Fault("session not found: "+req.SessionId, &types.NotFound{})
		return body
	}
	if !entityExists(req.Entity) {
		body.Fault_ = notFound(req.Entity)
		return body
	}
	res := []bool{}
	for _, p := range m.granted(user, req.Entity, req.PrivId) {
		res = append(res, p.IsGranted)
	}
	body.Res = &types.HasPrivilegeOnEntityResponse{Returnval: res}
	return body
}

func (m *authzManager) HasUserPrivilegeOnEntities(req *types.HasUserPrivilegeOnEntities) soap.HasFault {
	body := new(methods.HasUserPrivilegeOnEntitiesBody)
	res := []types.EntityPrivilege{}
	for _, e := range req.Entities {
		if !entityExists(e) {
			body.Fault_ = notFound(e)
			return body
		}
		res = append(res, types.EntityPrivilege{Entity: e, PrivAvailability: m.granted(req.UserName, e, req.PrivId)})
	}
	body.Res = &types.HasUserPrivilegeOnEntitiesResponse{Returnval: res}
	return body
}

func (m *authzManager) FetchUserPrivilegeOnEntities(req *types.FetchUserPrivilegeOnEntities) soap.HasFault {
	body := new(methods.FetchUserPrivilegeOnEntitiesBody)
	res := []types.UserPrivilegeResult{}
	for _, e := range req.Entities {
		if !entityExists(e) {
			body.Fault_ = notFound(e)
			return body
		}
		set, admin := m.privileges(req.UserName, e)
		var privs []string
		if admin {
			privs = append(privs, m.allPrivs...)
		} else {
			for p := range set {
				privs = append(privs, p)
			}
			sort.Strings(privs)
		}
		res = append(res, types.UserPrivilegeResult{Entity: e, Privileges: privs})
	}
	body.Res = &types.FetchUserPrivilegeOnEntitiesResponse{Returnval: res}
	return body
}

func (m *authzManager) validatePermissions(entity types.ManagedObjectReference, perms []types.Permission) *soap.Fault {
	if !entityExists(entity) {
		return notFound(entity)
	}
	for _, p := range perms {
		if strings.TrimSpace(p.Principal) == "" {
			return simulator.Fault("", &types.InvalidArgument{InvalidProperty: "permission.principal"})
		}
		if m.role(p.RoleId) == nil {
			return simulator.Fault("role not found", &types.NotFound{})
		}
	}
	return nil
}

func (m *authzManager) SetEntityPermissions(req *types.SetEntityPermissions) soap.HasFault {
	body := new(methods.SetEntityPermissionsBody)
	if f := m.validatePermissions(req.Entity, req.Permission); f != nil {
		body.Fault_ = f
		return body
	}
	for _, p := range req.Permission {
		m.setPermission(req.Entity, p)
	}
	body.Res = new(types.SetEntityPermissionsResponse)
	return body
}

func (m *authzManager) ResetEntityPermissions(req *types.ResetEntityPermissions) soap.HasFault {
	body := new(methods.ResetEntityPermissionsBody)
	if f := m.validatePermissions(req.Entity, req.Permission); f != nil {
		body.Fault_ = f
		return body
	}
	delete(m.perms, req.Entity)
	for _, p := range req.Permission {
		m.setPermission(req.Entity, p)
	}
	body.Res = new(types.ResetEntityPermissionsResponse)
	return body
}

func (m *authzManager) RemoveEntityPermission(req *types.RemoveEntityPermission) soap.HasFault {
	body := new(methods.RemoveEntityPermissionBody)
	if !entityExists(req.Entity) {
		body.Fault_ = notFound(req.Entity)
		return body
	}
	key := normalizePrincipal(req.User)
	var kept []types.Permission
	removed := false
	for _, p := range m.perms[req.Entity] {
		if p.Group == req.IsGroup && normalizePrincipal(p.Principal) == key {
			removed = true
			continue
		}
		kept = append(kept, p)
	}
	if !removed {
		body.Fault_ = simulator.Fault("permission not found", &types.NotFound{})
		return body
	}
	m.perms[req.Entity] = kept
	body.Res = new(types.RemoveEntityPermissionResponse)
	return body
}

func (m *authzManager) RetrieveEntityPermissions(req *types.RetrieveEntityPermissions) soap.HasFault {
	body := new(methods.RetrieveEntityPermissionsBody)
	if !entityExists(req.Entity) {
		body.Fault_ = notFound(req.Entity)
		return body
	}
	res := append([]types.Permission{}, m.perms[req.Entity]...)
	if req.Inherited {
		for ref := parentOf(req.Entity); ref != nil; ref = parentOf(*ref) {
			for _, p := range m.perms[*ref] {
				if p.Propagate {
					res = append(res, p)
				}
			}
		}
	}
	body.Res = &types.RetrieveEntityPermissionsResponse{Returnval: res}
	return body
}

func (m *authzManager) allPermissions(filter func(types.Permission) bool) []types.Permission {
	refs := make([]types.ManagedObjectReference, 0, len(m.perms))
	for ref := range m.perms {
		refs = append(refs, ref)
	}
	sort.Slice(refs, func(i, j int) bool {
		if refs[i].Type != refs[j].Type {
			return refs[i].Type < refs[j].Type
		}
		return refs[i].Value < refs[j].Value
	})
	res := []types.Permission{}
	for _, ref := range refs {
		for _, p := range m.perms[ref] {
			if filter == nil || filter(p) {
				res = append(res, p)
			}
		}
	}
	return res
}

func (m *authzManager) RetrieveAllPermissions(req *types.RetrieveAllPermissions) soap.HasFault {
	return &methods.RetrieveAllPermissionsBody{
		Res: &types.RetrieveAllPermissionsResponse{Returnval: m.allPermissions(nil)},
	}
}

func (m *authzManager) RetrieveRolePermissions(req *types.RetrieveRolePermissions) soap.HasFault {
	body := new(methods.RetrieveRolePermissionsBody)
	if m.role(req.RoleId) == nil {
		body.Fault_ = simulator.Fault("role not found", &types.NotFound{})
		return body
	}
	body.Res = &types.RetrieveRolePermissionsResponse{
		Returnval: m.allPermissions(func(p types.Permission) bool { return p.RoleId == req.RoleId }),
	}
	return body
}

// privIDs validates ids and adds the system privileges every role has.
func (m *authzManager) privIDs(ids []string) ([]string, *soap.Fault) {
	seen := map[string]bool{}
	var res []string
	for _, id := range append(append([]string{}, ids...), systemPrivileges...) {
		if !m.known[id] {
			return nil, simulator.Fault("unknown privilege: "+id, &types.InvalidArgument{InvalidProperty: "privIds"})
		}
		if !seen[id] {
			seen[id] = true
			res = append(res, id)
		}
	}
	sort.Strings(res)
	return res, nil
}

func (m *authzManager) AddAuthorizationRole(req *types.AddAuthorizationRole) soap.HasFault {
	body := new(methods.AddAuthorizationRoleBody)
	if strings.TrimSpace(req.Name) == "" {
		body.Fault_ = simulator.Fault("", &types.InvalidName{Name: req.Name})
		return body
	}
	for _, r := range m.RoleList {
		if r.Name == req.Name {
			body.Fault_ = simulator.Fault("", &types.AlreadyExists{Name: req.Name})
			return body
		}
	}
	ids, f := m.privIDs(req.PrivIds)
	if f != nil {
		body.Fault_ = f
		return body
	}
	id := m.nextRoleID
	m.nextRoleID++
	m.RoleList = append(m.RoleList, types.AuthorizationRole{
		RoleId:    id,
		System:    false,
		Name:      req.Name,
		Info:      &types.Description{Label: req.Name, Summary: req.Name},
		Privilege: ids,
	})
	body.Res = &types.AddAuthorizationRoleResponse{Returnval: id}
	return body
}

func (m *authzManager) UpdateAuthorizationRole(req *types.UpdateAuthorizationRole) soap.HasFault {
	body := new(methods.UpdateAuthorizationRoleBody)
	r := m.role(req.RoleId)
	if r == nil {
		body.Fault_ = simulator.Fault("role not found", &types.NotFound{})
		return body
	}
	if r.System || req.RoleId < 0 {
		body.Fault_ = simulator.Fault("system roles cannot be modified", &types.InvalidArgument{InvalidProperty: "roleId"})
		return body
	}
	for _, other := range m.RoleList {
		if other.Name == req.NewName && other.RoleId != req.RoleId {
			body.Fault_ = simulator.Fault("", &types.AlreadyExists{Name: req.NewName})
			return body
		}
	}
	if req.PrivIds != nil {
		ids, f := m.privIDs(req.PrivIds)
		if f != nil {
			body.Fault_ = f
			return body
		}
		r.Privilege = ids
	}
	if req.NewName != "" {
		r.Name = req.NewName
		r.Info = &types.Description{Label: req.NewName, Summary: req.NewName}
	}
	body.Res = new(types.UpdateAuthorizationRoleResponse)
	return body
}

func (m *authzManager) RemoveAuthorizationRole(req *types.RemoveAuthorizationRole) soap.HasFault {
	body := new(methods.RemoveAuthorizationRoleBody)
	r := m.role(req.RoleId)
	if r == nil {
		body.Fault_ = simulator.Fault("role not found", &types.NotFound{})
		return body
	}
	if r.System || req.RoleId < 0 {
		body.Fault_ = simulator.Fault("system roles cannot be removed", &types.InvalidArgument{InvalidProperty: "roleId"})
		return body
	}
	used := len(m.allPermissions(func(p types.Permission) bool { return p.RoleId == req.RoleId })) > 0
	if used && req.FailIfUsed {
		body.Fault_ = simulator.Fault("role is in use", &types.RemoveFailed{})
		return body
	}
	for ref, list := range m.perms {
		var kept []types.Permission
		for _, p := range list {
			if p.RoleId != req.RoleId {
				kept = append(kept, p)
			}
		}
		m.perms[ref] = kept
	}
	for i := range m.RoleList {
		if m.RoleList[i].RoleId == req.RoleId {
			m.RoleList = append(m.RoleList[:i], m.RoleList[i+1:]...)
			break
		}
	}
	body.Res = new(types.RemoveAuthorizationRoleResponse)
	return body
}

func (m *authzManager) MergePermissions(req *types.MergePermissions) soap.HasFault {
	body := new(methods.MergePermissionsBody)
	if m.role(req.SrcRoleId) == nil || m.role(req.DstRoleId) == nil {
		body.Fault_ = simulator.Fault("role not found", &types.NotFound{})
		return body
	}
	for ref, list := range m.perms {
		for i := range list {
			if list[i].RoleId == req.SrcRoleId {
				list[i].RoleId = req.DstRoleId
			}
		}
		m.perms[ref] = list
	}
	if req.SrcRoleId >= 0 {
		for i := range m.RoleList {
			if m.RoleList[i].RoleId == req.SrcRoleId {
				m.RoleList = append(m.RoleList[:i], m.RoleList[i+1:]...)
				break
			}
		}
	}
	body.Res = new(types.MergePermissionsResponse)
	return body
}
